//! Training data from shards: rows read from the Parquet files of a split, shuffled by seed with a
//! buffered shuffle, grouped into micro-batches by a token budget. The position (epoch, rows
//! consumed) is part of checkpoints, so a resumed run sees exactly the same batches.

use crate::pack::rows::PackedRow;
use crate::pack::shards::{list_shards, read_rows};
use crate::split::SplitMix64;
use anyhow::{bail, Result};
use std::path::Path;

pub struct Shards {
    pub rows: Vec<PackedRow>,
    pub tokens: u64,
    pub trained: u64,
}

impl Shards {
    pub fn load(dir: &Path, split: &str) -> Result<Shards> {
        let files = list_shards(dir, split)?;
        let mut rows = Vec::new();
        for f in files {
            rows.extend(read_rows(&f)?);
        }
        let tokens = rows.iter().map(|r| r.input_ids.len() as u64).sum();
        let trained = rows.iter().map(|r| r.labels.iter().filter(|&&l| l != -100).count() as u64).sum();
        Ok(Shards { rows, tokens, trained })
    }

    /// Row order for an epoch: a seeded shuffle (the whole split fits; shards are small per token).
    pub fn epoch_order(&self, seed: u64, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.rows.len()).collect();
        SplitMix64::new(seed ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407)).shuffle(&mut order);
        order
    }

    /// Micro-batches of row indices, each at most `budget` tokens (a longer row is alone).
    pub fn micro_batches(&self, order: &[usize], budget: usize) -> Vec<Vec<usize>> {
        let mut out = Vec::new();
        let mut cur = Vec::new();
        let mut tokens = 0;
        for &i in order {
            let n = self.rows[i].input_ids.len();
            if !cur.is_empty() && tokens + n > budget {
                out.push(std::mem::take(&mut cur));
                tokens = 0;
            }
            cur.push(i);
            tokens += n;
        }
        if !cur.is_empty() {
            out.push(cur);
        }
        out
    }
}

/// Refuses shards made with another vocabulary than the model's.
pub fn check_manifest(dir: &Path, model_vocab: usize) -> Result<serde_json::Value> {
    let p = dir.join("manifest.json");
    if !p.exists() {
        bail!("{}: no manifest.json; prepare writes it last, so these shards are incomplete", dir.display());
    }
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&p)?)?;
    let tok_vocab = m["tokenizer"]["vocab_size"].as_u64().unwrap_or(0) as usize;
    if tok_vocab > model_vocab {
        bail!(
            "{}: the shards were tokenized with {} (vocabulary {tok_vocab}), larger than the model's vocabulary {model_vocab}; \
             prepare them with the model's own tokenizer",
            dir.display(),
            m["tokenizer"]["path"].as_str().unwrap_or("?")
        );
    }
    Ok(m)
}
