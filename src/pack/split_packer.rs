//! One split's samples on their way into shards: a window of samples (`window_tokens` at a time)
//! packed into rows, the rows shuffled by the split's seed and written to its shard files, and the
//! split's statistics at the end.

use super::manifest::SplitStats;
use super::rows::{pack, PackMode};
use super::shards::ShardWriter;
use crate::split::SplitMix64;
use crate::tokenize::Sample;
use anyhow::Result;
use std::path::Path;

/// How a split packs its samples.
#[derive(Debug, Clone, Copy)]
pub struct Packing {
    pub mode: PackMode,
    pub seq_len: usize,
    /// Samples are packed a window of this many tokens at a time.
    pub window_tokens: usize,
}

/// One split's buffer of samples waiting to be packed.
pub struct SplitPacker {
    writer: ShardWriter,
    packing: Packing,
    window: Vec<Sample>,
    window_tokens: usize,
    samples: u64,
    rng: SplitMix64,
}

impl SplitPacker {
    pub fn new(dir: &Path, split: &'static str, seed: u64, shard_bytes: usize, packing: Packing) -> Self {
        SplitPacker {
            writer: ShardWriter::new(dir, split, shard_bytes),
            packing,
            window: Vec::new(),
            window_tokens: 0,
            samples: 0,
            rng: SplitMix64::new(seed),
        }
    }

    pub fn push(&mut self, s: Sample) -> Result<()> {
        self.window_tokens += s.len();
        self.samples += 1;
        self.window.push(s);
        if self.window_tokens >= self.packing.window_tokens {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        let mut rows = pack(&self.window, self.packing.mode, self.packing.seq_len);
        self.rng.shuffle(&mut rows);
        self.writer.write(rows)?;
        self.window.clear();
        self.window_tokens = 0;
        Ok(())
    }

    /// Packs what is left, closes the shard files and says what the split holds.
    pub fn finish(mut self) -> Result<SplitStats> {
        self.flush()?;
        let (rows, tokens, trained, samples) =
            (self.writer.rows, self.writer.tokens, self.writer.trained, self.samples);
        let files = self.writer.finish()?;
        let seq_len = self.packing.seq_len;
        Ok(SplitStats {
            samples,
            rows,
            tokens,
            trainable_tokens: trained,
            fill_ratio: if rows == 0 { 0.0 } else { tokens as f64 / (rows as f64 * seq_len as f64) },
            files: files.iter().map(|p| p.file_name().unwrap_or_default().to_string_lossy().to_string()).collect(),
        })
    }
}
