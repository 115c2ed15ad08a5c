//! `manifest.json`, the record of a shard directory (../shared/DESIGN.md): the tool, the sources
//! with their sha256, the tokenizer and template, the options, the accounting and each split's
//! statistics. Written last and atomically, so a directory without it is incomplete; read back by
//! train, eval and inspect. One type for every kind of shard directory; what a kind lacks is left
//! out of the file.

use super::fit::TooLong;
use super::rows::PackMode;
use crate::accounting::Counts;
use crate::dedup::DedupOptions;
use crate::output::AtomicFile;
use crate::tokenize::{LossMode, TokenizerInfo};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

pub const FILE: &str = "manifest.json";

/// The kind of a shard directory, as its manifest's `format` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ShardKind {
    /// Packed SFT rows (`prepare`).
    #[serde(rename = "tunekit-shards")]
    Sft,
    /// Preference pairs (`prepare --method dpo`).
    #[serde(rename = "tunekit-preference-shards")]
    Preference,
    /// Labelled unpaired rows (`prepare --method kto`).
    #[serde(rename = "tunekit-unpaired-shards")]
    Unpaired,
    /// Prompts for online RL (`prepare --method prompts`).
    #[serde(rename = "tunekit-prompt-shards")]
    Prompts,
    /// A manifest without a format tunekit writes.
    #[default]
    #[serde(other, rename = "unknown")]
    Unknown,
}

impl ShardKind {
    /// The manifest's name for it.
    pub fn name(self) -> &'static str {
        match self {
            ShardKind::Sft => "tunekit-shards",
            ShardKind::Preference => "tunekit-preference-shards",
            ShardKind::Unpaired => "tunekit-unpaired-shards",
            ShardKind::Prompts => "tunekit-prompt-shards",
            ShardKind::Unknown => "unknown",
        }
    }

    /// The `train --method`s that train on this kind of shard.
    pub fn methods(self) -> &'static [&'static str] {
        match self {
            ShardKind::Sft => &["sft"],
            ShardKind::Preference => &["dpo", "orpo", "simpo", "reward"],
            ShardKind::Unpaired => &["kto"],
            ShardKind::Prompts => &["grpo", "rloo", "ppo"],
            ShardKind::Unknown => &[],
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Manifest {
    /// What the shards hold.
    pub format: ShardKind,
    pub format_version: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    pub tool: Tool,
    pub sources: Vec<SourceFile>,
    pub tokenizer: TokenizerRecord,
    pub template: TemplateRecord,
    pub seq_len: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packing: Option<PackMode>,
    pub loss: LossMode,
    pub too_long: TooLong,
    pub seed: u64,
    pub eval_fraction: f64,
    pub dedup: DedupOptions,
    pub columns: Vec<String>,
    pub accounting: ManifestAccounting,
    pub splits: Splits,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Tool {
    pub name: String,
    pub version: String,
}

impl Tool {
    pub fn this() -> Tool {
        Tool { name: "tunekit".into(), version: crate::VERSION.into() }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SourceFile {
    pub path: String,
    pub sha256: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TokenizerRecord {
    pub path: String,
    pub sha256: String,
    pub vocab_size: usize,
    pub special_tokens: Map<String, Value>,
}

impl TokenizerRecord {
    pub fn of(tok: &TokenizerInfo) -> Self {
        TokenizerRecord {
            path: tok.path.display().to_string(),
            sha256: tok.sha256.clone(),
            vocab_size: tok.vocab_size,
            special_tokens: tok.specials.clone(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TemplateRecord {
    pub name: String,
    pub sha256: String,
}

/// Where every input row went, and what the shards hold (../shared/DESIGN.md, "Nothing lost").
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ManifestAccounting {
    pub rows_read: u64,
    pub rejected: u64,
    pub rejected_by_reason: BTreeMap<String, u64>,
    pub duplicates_exact: u64,
    pub duplicates_near: u64,
    #[serde(skip_serializing_if = "crate::accounting::is_zero")]
    pub filtered: u64,
    #[serde(skip_serializing_if = "crate::accounting::is_zero")]
    pub contaminated: u64,
    pub dropped_too_long: u64,
    /// Rows kept per input source (before the too-long drop).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub kept_by_source: BTreeMap<String, u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truncated: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub samples: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pairs: Option<u64>,
    /// kto: rows labelled desirable and undesirable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desirable: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub undesirable: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompts: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packed_rows: Option<u64>,
    pub tokens: u64,
    pub trainable_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fill_ratio: Option<f64>,
}

impl ManifestAccounting {
    /// The counts every kind shares, from a run's counts; the kind fills in what its shards hold.
    pub fn of(c: &Counts, dropped_too_long: u64) -> Self {
        ManifestAccounting {
            rows_read: c.rows_read,
            rejected: c.rejected,
            rejected_by_reason: c.rejected_by_reason.clone(),
            duplicates_exact: c.duplicates_exact,
            duplicates_near: c.duplicates_near,
            filtered: c.filtered,
            contaminated: c.contaminated,
            dropped_too_long,
            kept_by_source: c.kept_by_source.clone(),
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Splits {
    pub train: SplitStats,
    pub eval: SplitStats,
}

/// One split's shards: samples (or pairs), rows, tokens, trained tokens, fill and file names.
#[derive(Debug, Serialize, Deserialize, Clone, Default)]
#[serde(default)]
pub struct SplitStats {
    pub samples: u64,
    pub rows: u64,
    pub tokens: u64,
    pub trainable_tokens: u64,
    pub fill_ratio: f64,
    pub files: Vec<String>,
}

impl Manifest {
    /// Writes `dir/manifest.json` atomically (last: a shard directory without it is incomplete).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let mut f = AtomicFile::create(&dir.join(FILE))?;
        serde_json::to_writer_pretty(&mut f, self)?;
        f.write_all(b"\n")?;
        f.commit()
    }

    /// Reads `dir/manifest.json`; its absence means the directory is incomplete.
    pub fn read(dir: &Path) -> Result<Manifest> {
        let p = dir.join(FILE);
        if !p.exists() {
            bail!(
                "{}: no manifest.json; this is not a complete tunekit shard directory (prepare writes the manifest last)",
                dir.display()
            );
        }
        let bytes = std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("{}: not a tunekit manifest", p.display()))
    }

    /// The source of the chat template the shards were rendered with, when it can be had: the
    /// tokenizer's own (from `tokenizer_template`), a built-in by name, or the file the manifest names.
    pub fn template_source(&self, tokenizer_template: impl FnOnce() -> Option<String>) -> Option<String> {
        if self.template.name == "tokenizer" {
            return tokenizer_template();
        }
        crate::template::chat::CHAT_TEMPLATES
            .iter()
            .find(|(n, _)| *n == self.template.name)
            .map(|(_, s)| s.to_string())
            .or_else(|| std::fs::read_to_string(&self.template.name).ok())
    }

    /// Removes an earlier run's manifest, so that it never vouches for new, partial shards.
    pub fn remove(dir: &Path) {
        let _ = std::fs::remove_file(dir.join(FILE));
    }
}
