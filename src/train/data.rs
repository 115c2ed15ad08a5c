//! Training data from shards: packed rows read from the Parquet files of a split, shuffled by seed per
//! epoch and grouped into micro-batches by a token budget; preference pairs, likewise by epoch. The
//! order depends only on the seed and the epoch, so a resumed run sees exactly the same batches.

use crate::pack::manifest::Manifest;
use crate::pack::preference::{read_pairs, PreferenceRow};
use crate::pack::rows::PackedRow;
use crate::pack::shards::{list_shards, read_rows};
use crate::pack::unpaired::{read_unpaired, UnpairedRow};
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
        epoch_order(self.rows.len(), seed, epoch)
    }

    /// Micro-batches of row indices, each at most `budget` tokens (a longer row is alone).
    pub fn micro_batches(&self, order: &[usize], budget: usize) -> Vec<Vec<usize>> {
        micro_batches(order, budget, |i| self.rows[i].input_ids.len())
    }
}

/// The order of `n` rows in an epoch: a seeded shuffle.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    SplitMix64::new(seed ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407)).shuffle(&mut order);
    order
}

/// Rows in `order` grouped into micro-batches of at most `budget` tokens (`len` of a row; a longer
/// row is alone).
pub fn micro_batches(order: &[usize], budget: usize, len: impl Fn(usize) -> usize) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut tokens = 0;
    for &i in order {
        let n = len(i);
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

/// The preference pairs of a split (`{split}-00000-of-00001.parquet`; none when it is absent).
pub fn load_pairs(dir: &Path, split: &str) -> Result<Vec<PreferenceRow>> {
    let f = dir.join(crate::pack::shards::single_shard_file_name(split));
    if !f.exists() {
        return Ok(vec![]);
    }
    read_pairs(&f)
}

/// The labelled rows of an unpaired (KTO) split (`{split}-00000-of-00001.parquet`; none when it is absent).
pub fn load_unpaired(dir: &Path, split: &str) -> Result<Vec<UnpairedRow>> {
    let f = dir.join(crate::pack::shards::single_shard_file_name(split));
    if !f.exists() {
        return Ok(vec![]);
    }
    read_unpaired(&f)
}

/// The order of `n` pairs (or KTO rows) in an epoch: a seeded shuffle.
fn pair_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut o: Vec<usize> = (0..n).collect();
    SplitMix64::new(seed ^ epoch.wrapping_mul(0x9E37)).shuffle(&mut o);
    o
}

/// Steps of `per_step` examples over `n` a seeded shuffle per epoch (the last step of an epoch may
/// be short), the current epoch's order kept until the epoch changes: pure in the step, so a resumed
/// run sees the same examples.
pub struct EpochOrder {
    n: usize,
    per_step: usize,
    seed: u64,
    current: (Option<u64>, Vec<usize>),
}

impl EpochOrder {
    pub fn new(n: usize, per_step: usize, seed: u64) -> Self {
        EpochOrder { n, per_step, seed, current: (None, vec![]) }
    }

    pub fn steps_per_epoch(&self) -> u64 {
        self.n.div_ceil(self.per_step) as u64
    }

    /// The epoch's order of optimizer step `step` (0-based) and where the step starts in it.
    pub fn at(&mut self, step: u64) -> (&[usize], usize) {
        let epoch = step / self.steps_per_epoch();
        if self.current.0 != Some(epoch) {
            self.current = (Some(epoch), pair_order(self.n, self.seed, epoch));
        }
        (&self.current.1, (step % self.steps_per_epoch()) as usize * self.per_step)
    }

    /// The examples of step `step`.
    pub fn step(&mut self, step: u64) -> &[usize] {
        let per_step = self.per_step;
        let (order, at) = self.at(step);
        &order[at..(at + per_step).min(order.len())]
    }
}

/// Refuses shards made with another vocabulary than the model's.
pub fn check_manifest(dir: &Path, model_vocab: usize) -> Result<Manifest> {
    let m = Manifest::read(dir)?;
    let tok_vocab = m.tokenizer.vocab_size;
    if tok_vocab > model_vocab {
        bail!(
            "{}: the shards were tokenized with {} (vocabulary {tok_vocab}), larger than the model's vocabulary {model_vocab}; \
             prepare them with the model's own tokenizer",
            dir.display(),
            m.tokenizer.path
        );
    }
    Ok(m)
}
