//! `prepare --method sft` (the default): samples packed into rows of `--seq-len` tokens. Tokenizing
//! runs in parallel per batch; packing and Parquet writing run on their own thread, overlapping the
//! next batch. Each split packs a window of samples at a time, its rows shuffled by seed.

use super::{file_names, hash_sources, joined, manifest_path, PrepareOptions, PrepareSummary, Setup};
use crate::accounting::{reason, Reject, Tally};
use crate::admit::Front;
use crate::ingest::stream_conversations;
use crate::pack::fit::fit;
use crate::pack::manifest::{ManifestAccounting, SplitStats, Splits};
use crate::pack::rows::pack;
use crate::pack::shards::{list_shards, ShardWriter, COLUMNS};
use crate::record::Conversation;
use crate::split::{is_eval, SplitMix64};
use crate::tokenize::{Sample, Tokenizing};
use anyhow::{bail, Result};
use rayon::prelude::*;
use std::path::Path;
use std::time::Instant;

/// One split's buffer of samples waiting to be packed.
struct SplitPacker {
    writer: ShardWriter,
    window: Vec<Sample>,
    window_tokens: usize,
    samples: u64,
    rng: SplitMix64,
}

impl SplitPacker {
    fn new(dir: &Path, split: &'static str, seed: u64, shard_bytes: usize) -> Self {
        SplitPacker {
            writer: ShardWriter::new(dir, split, shard_bytes),
            window: Vec::new(),
            window_tokens: 0,
            samples: 0,
            rng: SplitMix64::new(seed),
        }
    }
    fn push(&mut self, s: Sample, opts: &PrepareOptions) -> Result<()> {
        self.window_tokens += s.len();
        self.samples += 1;
        self.window.push(s);
        if self.window_tokens >= opts.window_tokens {
            self.flush(opts)?;
        }
        Ok(())
    }
    fn flush(&mut self, opts: &PrepareOptions) -> Result<()> {
        let mut rows = pack(&self.window, opts.pack, opts.seq_len);
        self.rng.shuffle(&mut rows);
        self.writer.write(rows)?;
        self.window.clear();
        self.window_tokens = 0;
        Ok(())
    }
    fn finish(mut self, opts: &PrepareOptions) -> Result<SplitStats> {
        self.flush(opts)?;
        let (rows, tokens, trained, samples) =
            (self.writer.rows, self.writer.tokens, self.writer.trained, self.samples);
        let files = self.writer.finish()?;
        Ok(SplitStats {
            samples,
            rows,
            tokens,
            trainable_tokens: trained,
            fill_ratio: if rows == 0 { 0.0 } else { tokens as f64 / (rows as f64 * opts.seq_len as f64) },
            files: file_names(&files),
        })
    }
}

pub fn run(opts: &PrepareOptions) -> Result<PrepareSummary> {
    let start = Instant::now();
    let setup = Setup::new(opts)?;
    let tokenizing = Tokenizing { tok: &setup.tok, template: &setup.template, mode: opts.loss };
    for split in ["train", "eval"] {
        for old in list_shards(&opts.out, split)? {
            std::fs::remove_file(&old)?;
        }
    }
    let hashing = hash_sources(&opts.inputs);
    let mut front = Front::new(&opts.out, &opts.dedup, opts.strict, true);
    let (mut truncated, mut dropped) = (0u64, 0u64);
    let (pack_tx, pack_rx) = std::sync::mpsc::sync_channel::<Vec<(bool, Sample)>>(4);
    let packer = |rx: std::sync::mpsc::Receiver<Vec<(bool, Sample)>>| -> Result<(SplitStats, SplitStats)> {
        let mut train = SplitPacker::new(&opts.out, "train", opts.seed, opts.shard_bytes);
        let mut eval = SplitPacker::new(&opts.out, "eval", opts.seed ^ 0xE7A1, opts.shard_bytes);
        for batch in rx {
            for (to_eval, sample) in batch {
                if to_eval {
                    eval.push(sample, opts)?;
                } else {
                    train.push(sample, opts)?;
                }
            }
        }
        Ok((train.finish(opts)?, eval.finish(opts)?))
    };
    let pb = crate::progress::rows("prepare");
    let mut tokens_seen = 0u64;

    let (packing, streamed) = std::thread::scope(|scope| {
        let packing = scope.spawn(move || packer(pack_rx));
        let streamed = stream_conversations(&opts.inputs, &opts.map, |batch| {
            let kept = front.admit(batch.items)?;
            let results: Vec<(Conversation, Result<Sample, crate::tokenize::mask::SampleError>)> = kept
                .into_par_iter()
                .map(|c| {
                    let s = tokenizing.sample(&c);
                    (c, s)
                })
                .collect();
            let mut to_pack = Vec::with_capacity(results.len());
            for (c, res) in results {
                let sample = res.and_then(|s| {
                    tokens_seen += s.len() as u64;
                    fit(s, opts.seq_len, opts.too_long)
                });
                match sample {
                    Ok((sample, cut)) => {
                        truncated += cut as u64;
                        front.counts.keep(&c.id);
                        to_pack.push((is_eval(&c.id, opts.seed, opts.eval_fraction), sample));
                    }
                    Err((why, detail)) => {
                        dropped += (why == reason::TOO_LONG) as u64;
                        front.reject(Reject::for_conversation(&c, why, detail))?;
                    }
                }
            }
            if pack_tx.send(to_pack).is_err() {
                bail!("the packing thread stopped");
            }
            pb.set_position(front.counts.rows_read);
            pb.set_message(format!("{} tokens", tokens_seen));
            Ok(())
        });
        drop(pack_tx);
        (packing.join(), streamed)
    });
    streamed?;
    let (train, eval) = packing.map_err(|_| anyhow::anyhow!("packing thread panicked"))??;
    pb.finish_and_clear();
    let files = front.finish()?;
    let counts = front.counts.clone();
    if !counts.balanced() {
        bail!("internal accounting error: {:?}", counts);
    }
    let sources = joined(hashing, "hashing")?;
    let samples = train.samples + eval.samples;
    let rows = train.rows + eval.rows;
    let tokens = train.tokens + eval.tokens;
    let trainable = train.trainable_tokens + eval.trainable_tokens;
    let fill = if rows == 0 { 0.0 } else { tokens as f64 / (rows as f64 * opts.seq_len as f64) };
    let accounting = ManifestAccounting {
        truncated: Some(truncated),
        samples: Some(samples),
        packed_rows: Some(rows),
        tokens,
        trainable_tokens: trainable,
        fill_ratio: Some(fill),
        ..ManifestAccounting::of(&counts, dropped)
    };
    let mut manifest = setup.manifest(opts, sources, accounting);
    manifest.format = "tunekit-shards".into();
    manifest.packing = Some(opts.pack);
    manifest.columns = COLUMNS.iter().map(|c| c.to_string()).collect();
    manifest.splits = Splits { train: train.clone(), eval: eval.clone() };
    manifest.write(&opts.out)?;
    crate::report::html::write_beside(&opts.out);
    let tally = Tally::new(counts, files, start);
    tally.verdict("prepare")?;
    Ok(PrepareSummary {
        command: "prepare",
        method: super::PrepareMethod::Sft,
        out: opts.out.display().to_string(),
        manifest: manifest_path(&opts.out),
        tokens_per_s: tokens_seen as f64 / tally.seconds.max(1e-9),
        tally,
        truncated,
        dropped_too_long: dropped,
        samples,
        packed_rows: rows,
        tokens,
        trainable_tokens: trainable,
        fill_ratio: fill,
        train,
        eval,
    })
}
