//! `prepare --method sft` (the default): samples packed into rows of `--seq-len` tokens. Tokenizing
//! runs in parallel per batch; packing and Parquet writing run on their own thread, overlapping the
//! next batch. Each split packs a window of samples at a time, its rows shuffled by seed. The
//! sequential half ([`Consumer`]) is shared by the one-process run and `merge-parts`, which feeds
//! it the batches of a sharded run's parts in input order: both write the same directory.

use super::{finish, hash_sources, joined, Made, PrepareOptions, PrepareSummary, Setup};
use crate::accounting::{reason, Reject};
use crate::admit::Front;
use crate::cluster::launch::Share;
use crate::commands::parts::{part_digest, PartSummary};
use crate::ingest::{stream_conversations, Item};
use crate::pack::fit::fit;
use crate::pack::manifest::{Manifest, ManifestAccounting, ShardKind, SourceFile, SplitStats};
use crate::pack::shards::{list_shards, COLUMNS};
use crate::pack::split_packer::{Packing, SplitPacker};
use crate::parts::block::{Block, Tokenized};
use crate::parts::part::{blocks_in_order, PartMeta, PartWriter, Settings, TokenizingRecord};
use crate::parts::set_aside::{LateTokenizer, OwnShare};
use crate::record::Conversation;
use crate::split::is_eval;
use crate::tokenize::mask::SampleError;
use crate::tokenize::{Sample, Tokenizing};
use anyhow::{bail, Result};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The sequential half of prepare: each batch's kept conversations with their samples (or why they
/// have none) fitted to --seq-len, counted, routed to train or eval and handed to the packer.
pub struct Consumer<'a> {
    opts: &'a PrepareOptions,
    pub front: Front,
    truncated: u64,
    dropped: u64,
    tokens_seen: u64,
    pack_tx: std::sync::mpsc::SyncSender<Vec<(bool, Sample)>>,
    pb: indicatif::ProgressBar,
}

impl Consumer<'_> {
    pub fn take(&mut self, results: Vec<(Conversation, Result<Sample, SampleError>)>) -> Result<()> {
        let opts = self.opts;
        let mut to_pack = Vec::with_capacity(results.len());
        for (c, res) in results {
            let sample = res.and_then(|s| {
                self.tokens_seen += s.len() as u64;
                fit(s, opts.seq_len, opts.too_long)
            });
            match sample {
                Ok((sample, cut)) => {
                    self.truncated += cut as u64;
                    self.front.counts.keep(&c.id);
                    to_pack.push((is_eval(&c.id, opts.seed, opts.eval_fraction), sample));
                }
                Err((why, detail)) => {
                    self.dropped += (why == reason::TOO_LONG) as u64;
                    self.front.reject(Reject::for_conversation(&c, why, detail))?;
                }
            }
        }
        if self.pack_tx.send(to_pack).is_err() {
            bail!("the packing thread stopped");
        }
        self.pb.set_position(self.front.counts.rows_read);
        self.pb.set_message(format!("{} tokens", self.tokens_seen));
        Ok(())
    }
}

/// What the sequential half leaves: the front (counts, side files) and what was packed.
struct Packed {
    front: Front,
    truncated: u64,
    dropped: u64,
    tokens_seen: u64,
    train: SplitStats,
    eval: SplitStats,
}

/// Runs `feed` (which hands the consumer every batch, in input order) against a packer thread.
fn consume(opts: &PrepareOptions, front: Front, feed: impl FnOnce(&mut Consumer) -> Result<()>) -> Result<Packed> {
    for split in ["train", "eval"] {
        for old in list_shards(&opts.out, split)? {
            std::fs::remove_file(&old)?;
        }
    }
    let (pack_tx, pack_rx) = std::sync::mpsc::sync_channel::<Vec<(bool, Sample)>>(4);
    let packer = |rx: std::sync::mpsc::Receiver<Vec<(bool, Sample)>>| -> Result<(SplitStats, SplitStats)> {
        let packing = Packing { mode: opts.pack, seq_len: opts.seq_len, window_tokens: opts.window_tokens };
        let mut train = SplitPacker::new(&opts.out, "train", opts.seed, opts.shard_bytes, packing);
        let mut eval = SplitPacker::new(&opts.out, "eval", opts.seed ^ 0xE7A1, opts.shard_bytes, packing);
        for batch in rx {
            for (to_eval, sample) in batch {
                if to_eval {
                    eval.push(sample)?;
                } else {
                    train.push(sample)?;
                }
            }
        }
        Ok((train.finish()?, eval.finish()?))
    };
    let mut c = Consumer {
        opts,
        front,
        truncated: 0,
        dropped: 0,
        tokens_seen: 0,
        pack_tx,
        pb: crate::progress::rows("prepare"),
    };
    let (packing, fed) = std::thread::scope(|scope| {
        let packing = scope.spawn(move || packer(pack_rx));
        let fed = feed(&mut c);
        let Consumer { front, truncated, dropped, tokens_seen, pack_tx, pb, .. } = c;
        drop(pack_tx);
        pb.finish_and_clear();
        (packing.join(), fed.map(|()| (front, truncated, dropped, tokens_seen)))
    });
    let (front, truncated, dropped, tokens_seen) = fed?;
    let (train, eval) = packing.map_err(|_| anyhow::anyhow!("packing thread panicked"))??;
    Ok(Packed { front, truncated, dropped, tokens_seen, train, eval })
}

pub fn run(opts: &PrepareOptions) -> Result<PrepareSummary> {
    let start = Instant::now();
    let setup = Setup::new(opts)?;
    let tokenizing = Tokenizing { tok: &setup.tok, template: &setup.template, mode: opts.loss };
    let hashing = hash_sources(&opts.inputs);
    let front = Front::new(&opts.out, &opts.dedup, opts.strict, true);
    let packed = consume(opts, front, |c| {
        stream_conversations(&opts.inputs, &opts.map, |batch| {
            let kept = c.front.admit(batch.items)?;
            c.take(
                kept.into_par_iter()
                    .map(|c| {
                        let s = tokenizing.sample(&c);
                        (c, s)
                    })
                    .collect(),
            )
        })
    })?;
    let sources = joined(hashing, "hashing")?;
    finish_packed(opts, setup.manifest(opts, ShardKind::Sft, sources), packed, start)
}

/// A rank's share of a sharded prepare (`--rank/--world-size`): its batches read, mapped, checked
/// and tokenized into its part, for `merge-parts` to replay.
pub fn run_part(opts: &PrepareOptions, share: Share) -> Result<PartSummary> {
    let start = Instant::now();
    let digest = part_digest(&opts.inputs)?;
    if let Some(meta) = PartMeta::complete(&opts.out, &share, &digest) {
        return Ok(PartSummary::of(&opts.out, &meta, true, start));
    }
    let setup = Setup::new(opts)?;
    let tokenizing = Tokenizing { tok: &setup.tok, template: &setup.template, mode: opts.loss };
    let mut own = OwnShare::new(&opts.dedup);
    let mut part = PartWriter::create(&opts.out, &share)?;
    let pb = crate::progress::rows("prepare (part)");
    stream_conversations(&opts.inputs, &opts.map, |batch| {
        let convs: Vec<&Conversation> = batch.items.iter().filter_map(Item::conversation).collect();
        let prepared = own.prepare(&convs);
        let fresh = own.fresh(&convs, &prepared);
        let samples: Vec<Option<Tokenized>> =
            convs.par_iter().zip(fresh).map(|(c, fresh)| fresh.then(|| Tokenized::of(tokenizing.sample(c)))).collect();
        part.write(Block::new(batch.index, batch.items, prepared.into_iter().zip(samples).collect()))?;
        pb.set_position(part.rows);
        Ok(())
    })?;
    pb.finish_and_clear();
    // Input i is hashed by rank i mod world size; the merge puts the list back together.
    let mine: Vec<(usize, PathBuf)> =
        opts.inputs.iter().cloned().enumerate().filter(|(i, _)| i % share.world_size == share.rank).collect();
    let sources = mine
        .into_iter()
        .map(|(i, p)| Ok((i, SourceFile { path: p.display().to_string(), sha256: crate::digest::sha256_file(&p)? })))
        .collect::<Result<Vec<_>>>()?;
    let mut meta = PartMeta {
        command: "prepare".into(),
        rank: share.rank,
        world_size: share.world_size,
        digest,
        settings: Settings { window_tokens: opts.window_tokens, shard_bytes: opts.shard_bytes, strict: opts.strict },
        manifest: setup.manifest(opts, ShardKind::Sft, vec![]),
        output: None,
        sources,
        blocks: part.count,
        rows: part.rows,
        blocks_bytes: None,
        tokenizing: Some(TokenizingRecord {
            tokenizer: std::path::absolute(&opts.tokenizer)?.display().to_string(),
            template: setup.template.source.clone(),
        }),
        set_aside: own.set_aside,
    };
    part.finish(&mut meta)?;
    Ok(PartSummary::of(&opts.out, &meta, false, start))
}

/// `merge-parts`: the parts of `out` replayed in the global input order through the sequential
/// half, writing the shards, side files and manifest one process would have written.
pub fn merge(out: &Path, metas: Vec<PartMeta>) -> Result<PrepareSummary> {
    let start = Instant::now();
    let first = &metas[0];
    let m = &first.manifest;
    let mut opts = PrepareOptions::new(vec![], out.to_path_buf(), PathBuf::from(&m.tokenizer.path));
    opts.seq_len = m.seq_len;
    opts.pack = m.packing.unwrap_or(opts.pack);
    opts.loss = m.loss;
    opts.too_long = m.too_long;
    opts.seed = m.seed;
    opts.eval_fraction = m.eval_fraction;
    opts.dedup = m.dedup.clone();
    opts.window_tokens = first.settings.window_tokens;
    opts.shard_bytes = first.settings.shard_bytes;
    opts.strict = first.settings.strict;
    Manifest::remove(out);
    let mut sources: Vec<(usize, SourceFile)> = metas.iter().flat_map(|p| p.sources.clone()).collect();
    sources.sort_by_key(|s| s.0);
    let template = Manifest { sources: sources.into_iter().map(|s| s.1).collect(), ..m.clone() };
    let front = Front::new(out, &opts.dedup, opts.strict, true);
    let blocks = blocks_in_order(out, &metas)?;
    let mut late = LateTokenizer::new(m, first.tokenizing.as_ref());
    let packed = consume(&opts, front, |c| {
        for b in blocks {
            let (items, extra) = b?.into_items();
            let kept = c.front.admit_prepared(items, extra)?;
            c.take(late.samples(kept)?)?;
        }
        Ok(())
    })?;
    let mut summary = finish_packed(&opts, template, packed, start)?;
    summary.tokenized_at_merge = Some(late.count);
    Ok(summary)
}

/// The end of every way of running sft prepare (one process, merge-parts): packing's figures into
/// the manifest and the summary.
fn finish_packed(
    opts: &PrepareOptions,
    mut manifest: Manifest,
    packed: Packed,
    start: Instant,
) -> Result<PrepareSummary> {
    let Packed { front, truncated, dropped, tokens_seen, train, eval } = packed;
    let samples = train.samples + eval.samples;
    let rows = train.rows + eval.rows;
    let tokens = train.tokens + eval.tokens;
    let trainable = train.trainable_tokens + eval.trainable_tokens;
    let fill = if rows == 0 { 0.0 } else { tokens as f64 / (rows as f64 * opts.seq_len as f64) };
    manifest.format = ShardKind::Sft;
    manifest.packing = Some(opts.pack);
    manifest.columns = COLUMNS.iter().map(|c| c.to_string()).collect();
    let account = |shared| ManifestAccounting {
        truncated: Some(truncated),
        samples: Some(samples),
        packed_rows: Some(rows),
        tokens,
        trainable_tokens: trainable,
        fill_ratio: Some(fill),
        ..shared
    };
    let made = Made {
        method: super::PrepareMethod::Sft,
        truncated,
        dropped_too_long: dropped,
        samples,
        packed_rows: rows,
        tokens,
        trainable_tokens: trainable,
        fill_ratio: fill,
        tokens_seen,
        train,
        eval,
    };
    finish(opts, front, manifest, account, made, start)
}
