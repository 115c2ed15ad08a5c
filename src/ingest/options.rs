//! What a user asks of ingest: the format and its column renames, the templates of the columns
//! format, how files are read, which rows (`--sql`, `--limit`, `--sample`), the quality filters,
//! and this rank's share of a sharded run.

use super::read::ReadOptions;
use anyhow::{bail, Result};
use serde::Serialize;

/// The dataset format of the inputs (`--format`); `auto` tells it from each file's columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    Auto,
    Alpaca,
    Dolly,
    Sharegpt,
    Messages,
    PromptCompletion,
    Preference,
    Text,
    Columns,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Auto => "auto",
            Format::Alpaca => "alpaca",
            Format::Dolly => "dolly",
            Format::Sharegpt => "sharegpt",
            Format::Messages => "messages",
            Format::PromptCompletion => "prompt-completion",
            Format::Preference => "preference",
            Format::Text => "text",
            Format::Columns => "columns",
        }
    }
}

/// User options that shape the mapping.
#[derive(Debug, Clone, Default)]
pub struct MapOptions {
    pub format: Option<Format>,
    /// A system message added to every conversation that has none.
    pub system: Option<String>,
    /// `field=column` renames: read the format's `field` from the row's `column`.
    pub renames: Vec<(String, String)>,
    /// minijinja templates over the row's columns (columns format).
    pub prompt: Option<String>,
    pub completion: Option<String>,
    /// A built-in prompt template name or a path to a `.jinja` file with prompt/completion blocks.
    pub template: Option<String>,
    /// Rows become prompts for online RL (`prepare --method prompts`): the answer is optional, and
    /// every column of the row is kept, as text, in `meta.columns` for reward functions.
    pub prompts: bool,
    /// Rows carry a desirability label (`prepare --method kto`): the row's `label` column (or the
    /// one `--map label=COLUMN` names), true/false, 1/0 or yes/no, kept as `meta.label`.
    pub labelled: bool,
    /// How files' bytes are read (delimiter, encoding, sheet).
    pub read: ReadOptions,
    /// Which rows: a `--sql` query, `--limit`, `--sample` (the table path when any is set).
    pub select: Selection,
    /// Quality filters every mapped conversation must pass.
    pub quality: crate::quality::Quality,
    /// This rank's share of the batches in a sharded run (`--rank/--world-size`); all when None.
    pub share: Option<crate::cluster::launch::Share>,
}

impl MapOptions {
    pub fn parse_renames(spec: &[String]) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for part in spec.iter().flat_map(|s| s.split(',')) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            match part.split_once('=') {
                Some((f, c)) if !f.trim().is_empty() && !c.trim().is_empty() => {
                    out.push((f.trim().to_string(), c.trim().to_string()))
                }
                _ => bail!("--map expects field=column pairs separated by commas, got '{part}'"),
            }
        }
        Ok(out)
    }
}

/// Which rows of the inputs to use.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// A polars SQL query over the inputs' tables.
    pub sql: Option<String>,
    /// At most this many rows (the first, after the query).
    pub limit: Option<usize>,
    /// This many rows drawn at random (seeded), after the query, in their order.
    pub sample: Option<usize>,
    pub seed: u64,
}

impl Selection {
    pub fn is_active(&self) -> bool {
        self.sql.is_some() || self.limit.is_some() || self.sample.is_some()
    }
}
