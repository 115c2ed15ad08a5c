//! The pre-flight doctor: reads a shard directory (SFT, preference or prompt shards) and finds
//! what would spoil a training run before it starts: answers whose end-of-turn token is not
//! trained (the model never stops), doubled or missing BOS, special-token text inside answers,
//! token ids beyond the vocabulary, answers cut by truncation, rows that do not hold together, and,
//! against the model, another tokenizer or chat template than the model's own. Each finding is a
//! check with its severity, how often it occurs, where (split, shard, row, segment, token) and
//! what to do. [`sequence`] holds the checks of one token sequence; [`model`] the checks against
//! the model.

pub mod model;
pub mod sequence;

use crate::pack::manifest::{Manifest, ShardKind};
use crate::pack::preference::read_pairs;
use crate::pack::prompts::read_prompts;
use crate::pack::shards::{list_shards, read_rows, single_shard_file_name};
use crate::pack::unpaired::read_unpaired;
use anyhow::Result;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

pub use sequence::TokenFacts;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// Where a finding was seen.
#[derive(Debug, Clone, Serialize)]
pub struct Location {
    pub split: &'static str,
    pub file: String,
    /// 0-based row of the shard file (as `tunekit inspect --show` counts within the split).
    pub row: usize,
    /// 0-based packed segment of the row (chosen 0, rejected 1 for preference rows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segment: Option<usize>,
    /// 0-based token position within the segment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<usize>,
    pub detail: String,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} row {}", self.file, self.row)?;
        if let Some(s) = self.segment {
            write!(f, " segment {s}")?;
        }
        if let Some(t) = self.token {
            write!(f, " token {t}")?;
        }
        write!(f, ": {}", self.detail)
    }
}

/// One kind of problem, with its count and the first places it was seen.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub check: &'static str,
    pub severity: Severity,
    pub count: u64,
    pub what: String,
    pub fix: String,
    pub examples: Vec<Location>,
}

/// Examples kept per check.
const EXAMPLES: usize = 3;

/// Findings gathered by check.
#[derive(Default)]
pub struct Findings {
    by_check: BTreeMap<&'static str, Finding>,
}

impl Findings {
    pub fn add(&mut self, check: &'static str, severity: Severity, what: &str, fix: &str, at: Option<Location>) {
        let f = self.by_check.entry(check).or_insert_with(|| Finding {
            check,
            severity,
            count: 0,
            what: what.to_string(),
            fix: fix.to_string(),
            examples: vec![],
        });
        f.count += 1;
        if let Some(at) = at {
            if f.examples.len() < EXAMPLES {
                f.examples.push(at);
            }
        }
    }

    /// Errors first, then warnings, each by check name.
    pub fn into_sorted(self) -> Vec<Finding> {
        let mut v: Vec<Finding> = self.by_check.into_values().collect();
        v.sort_by(|a, b| a.severity.cmp(&b.severity).then(a.check.cmp(b.check)));
        v
    }
}

/// What the sequences of a shard directory hold, beside the findings.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Scanned {
    pub rows: u64,
    pub sequences: u64,
    pub tokens: u64,
    pub trained_tokens: u64,
    pub max_token_id: i64,
    /// Every training row's packed segment lengths, in file order (for the memory estimate).
    #[serde(skip)]
    pub train_rows: Vec<Vec<usize>>,
}

/// Runs every sequence check over the shards of `dir`.
pub fn scan(dir: &Path, manifest: &Manifest, facts: &TokenFacts, findings: &mut Findings) -> Result<Scanned> {
    let mut s = Scanned { max_token_id: -1, ..Default::default() };
    let truncating = manifest.too_long == crate::pack::fit::TooLong::Truncate;
    let check = |s: &mut Scanned, findings: &mut Findings, q: Seq| {
        s.sequences += 1;
        s.tokens += q.ids.len() as u64;
        s.trained_tokens += q.labels.iter().filter(|&&l| l != -100).count() as u64;
        s.max_token_id = s.max_token_id.max(q.ids.iter().copied().max().unwrap_or(-1) as i64);
        let at = |token: Option<usize>, detail: String| Location {
            split: q.split,
            file: q.file.to_string(),
            row: q.row,
            segment: q.segment,
            token,
            detail,
        };
        sequence::check(q.ids, q.labels, facts, truncating, &at, findings);
    };
    for split in ["train", "eval"] {
        match manifest.format {
            ShardKind::Preference => {
                let f = dir.join(single_shard_file_name(split));
                if !f.exists() {
                    continue;
                }
                let name = file_name(&f);
                for (i, r) in read_pairs(&f)?.iter().enumerate() {
                    s.rows += 1;
                    let q = Seq { split, file: &name, row: i, segment: Some(0), ids: &[], labels: &[] };
                    check(&mut s, findings, Seq { ids: &r.chosen_input_ids, labels: &r.chosen_labels, ..q });
                    let q = Seq { segment: Some(1), ids: &r.rejected_input_ids, labels: &r.rejected_labels, ..q };
                    check(&mut s, findings, q);
                }
            }
            ShardKind::Unpaired => {
                let f = dir.join(single_shard_file_name(split));
                if !f.exists() {
                    continue;
                }
                let name = file_name(&f);
                for (i, r) in read_unpaired(&f)?.iter().enumerate() {
                    s.rows += 1;
                    check(
                        &mut s,
                        findings,
                        Seq { split, file: &name, row: i, segment: None, ids: &r.input_ids, labels: &r.labels },
                    );
                }
            }
            ShardKind::Prompts => {
                for f in list_shards(dir, split)? {
                    let name = file_name(&f);
                    for (i, r) in read_prompts(&f)?.iter().enumerate() {
                        s.rows += 1;
                        let q = Seq { split, file: &name, row: i, segment: None, ids: &r.prompt_ids, labels: &[] };
                        check(&mut s, findings, q);
                    }
                }
            }
            _ => {
                for f in list_shards(dir, split)? {
                    let name = file_name(&f);
                    for (i, r) in read_rows(&f)?.iter().enumerate() {
                        s.rows += 1;
                        if let Err(detail) = sequence::row_shape(r) {
                            let at = Location { split, file: name.clone(), row: i, segment: None, token: None, detail };
                            findings.add(
                                "corrupt_row",
                                Severity::Error,
                                "a row whose columns do not hold together (lengths, segments, positions)",
                                "prepare the shards again; a shard written by another tool must follow ../shared/DESIGN.md",
                                Some(at),
                            );
                            continue;
                        }
                        let mut at = 0usize;
                        for (k, &l) in r.seq_lengths.iter().enumerate() {
                            let l = l as usize;
                            let (ids, labels) = (&r.input_ids[at..at + l], &r.labels[at..at + l]);
                            check(&mut s, findings, Seq { split, file: &name, row: i, segment: Some(k), ids, labels });
                            at += l;
                        }
                        if split == "train" {
                            s.train_rows.push(r.seq_lengths.iter().map(|&l| l as usize).collect());
                        }
                    }
                }
            }
        }
    }
    Ok(s)
}

/// One token sequence and where it is.
#[derive(Clone, Copy)]
struct Seq<'a> {
    split: &'static str,
    file: &'a str,
    row: usize,
    segment: Option<usize>,
    ids: &'a [i32],
    labels: &'a [i32],
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default()
}
