//! `tunekit prepare`: the main job. One streaming pass of convert -> dedup -> tokenize with loss
//! masks -> split -> pack -> Parquet shards, then `manifest.json` (written last: a directory
//! without it is incomplete).

use crate::accounting::{reason, Counts, Reject};
use crate::dedup::front::Front;
use crate::dedup::DedupOptions;
use crate::ingest::{stream_conversations, MapOptions};
use crate::output::AtomicFile;
use crate::pack::rows::{pack, PackMode};
use crate::pack::shards::ShardWriter;
use crate::record::Conversation;
use crate::split::{is_eval, SplitMix64};
use crate::template::chat::{hex, ChatTemplate};
use crate::tokenize::{LossMode, Sample, TokenizerInfo, Tokenizing};
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TooLong {
    /// Drop samples longer than --seq-len (written to rejects.jsonl as too_long).
    Drop,
    /// Keep the first --seq-len tokens.
    Truncate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PrepareMethod {
    /// Packed SFT shards (input_ids, labels, position_ids, seq_lengths).
    Sft,
    /// Preference shards for DPO / reward models: one pair per row, answers trained.
    Preference,
}

pub struct PrepareOptions {
    pub method: PrepareMethod,
    pub inputs: Vec<PathBuf>,
    pub out: PathBuf,
    pub map: MapOptions,
    pub strict: bool,
    pub tokenizer: PathBuf,
    pub template: Option<String>,
    pub seq_len: usize,
    pub pack: PackMode,
    pub loss: LossMode,
    pub eval_fraction: f64,
    pub seed: u64,
    pub too_long: TooLong,
    pub dedup: DedupOptions,
    /// Tokens buffered per split before packing (the packer's window).
    pub window_tokens: usize,
    /// Uncompressed bytes per shard file before a new one starts.
    pub shard_bytes: usize,
}

impl PrepareOptions {
    pub fn new(inputs: Vec<PathBuf>, out: PathBuf, tokenizer: PathBuf) -> Self {
        PrepareOptions {
            method: PrepareMethod::Sft,
            inputs,
            out,
            map: MapOptions::default(),
            strict: false,
            tokenizer,
            template: None,
            seq_len: 2048,
            pack: PackMode::Bfd,
            loss: LossMode::Assistant,
            eval_fraction: 0.02,
            seed: 0,
            too_long: TooLong::Drop,
            dedup: DedupOptions::default(),
            window_tokens: 2 << 20,
            shard_bytes: 256 << 20,
        }
    }
}

#[derive(Debug, Serialize, Clone, Default)]
pub struct SplitStats {
    pub samples: u64,
    pub rows: u64,
    pub tokens: u64,
    pub trainable_tokens: u64,
    pub fill_ratio: f64,
    pub files: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct PrepareSummary {
    pub command: &'static str,
    pub method: PrepareMethod,
    pub out: String,
    pub manifest: String,
    #[serde(flatten)]
    pub counts: Counts,
    pub truncated: u64,
    pub dropped_too_long: u64,
    pub samples: u64,
    pub packed_rows: u64,
    pub tokens: u64,
    pub trainable_tokens: u64,
    pub fill_ratio: f64,
    pub train: SplitStats,
    pub eval: SplitStats,
    pub rejects_file: Option<String>,
    pub duplicates_file: Option<String>,
    pub seconds: f64,
    pub rows_per_s: f64,
    pub tokens_per_s: f64,
}

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
            files: files.iter().map(|p| p.file_name().unwrap_or_default().to_string_lossy().to_string()).collect(),
        })
    }
}

/// Picks the chat template: --template (built-in name or file), else the tokenizer's own.
pub fn chat_template(tok: &TokenizerInfo, template: Option<&str>) -> Result<ChatTemplate> {
    match template {
        Some(t) => ChatTemplate::builtin_or_file(t, tok.specials.clone()),
        None => match &tok.chat_template {
            Some(src) => ChatTemplate::new("tokenizer", src, tok.specials.clone()),
            None => bail!(
                "{} has no chat_template; pass --template with a built-in (chatml, llama3, mistral, gemma, phi3, zephyr, alpaca) or a .jinja file",
                tok.path.display()
            ),
        },
    }
}

/// Writes `manifest.json` (last, atomically: a shard directory without it is incomplete).
pub(crate) fn write_manifest(path: &Path, manifest: &Value) -> Result<()> {
    let mut mf = AtomicFile::create(path)?;
    serde_json::to_writer_pretty(&mut mf, manifest)?;
    mf.write_all(b"\n")?;
    mf.commit()
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex(&h.finalize()))
}

pub fn run(opts: &PrepareOptions) -> Result<PrepareSummary> {
    if opts.method == PrepareMethod::Preference {
        return crate::prepare_preference::run(opts);
    }
    let start = Instant::now();
    if opts.seq_len < 8 {
        bail!("--seq-len {} is too small", opts.seq_len);
    }
    if !(0.0..1.0).contains(&opts.eval_fraction) {
        bail!("--eval-fraction must be in [0, 1), got {}", opts.eval_fraction);
    }
    let tok = TokenizerInfo::load(&opts.tokenizer)?;
    let template = chat_template(&tok, opts.template.as_deref())?;
    let tokenizing = Tokenizing { tok: &tok, template: &template, mode: opts.loss };
    std::fs::create_dir_all(&opts.out).with_context(|| format!("cannot create {}", opts.out.display()))?;
    // A re-run must not leave an old manifest that vouches for new, partial shards.
    let manifest_path = opts.out.join("manifest.json");
    let _ = std::fs::remove_file(&manifest_path);
    for split in ["train", "eval"] {
        for old in crate::pack::shards::list_shards(&opts.out, split)? {
            std::fs::remove_file(&old)?;
        }
    }
    let inputs = opts.inputs.clone();
    let hashing = std::thread::spawn(move || -> Result<Vec<(String, String)>> {
        inputs.iter().map(|p| Ok((p.display().to_string(), sha256_file(p)?))).collect()
    });

    let mut front = Front::new(&opts.out, &opts.dedup, opts.strict, true);
    let (mut truncated, mut dropped) = (0u64, 0u64);
    // Packing and Parquet writing run on their own thread, overlapping the next batch's tokenization.
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
                let mut sample = match res {
                    Ok(s) => s,
                    Err((reason, detail)) => {
                        front.reject(Reject::for_conversation(&c, reason, detail))?;
                        continue;
                    }
                };
                tokens_seen += sample.len() as u64;
                if sample.len() > opts.seq_len {
                    match opts.too_long {
                        TooLong::Drop => {
                            dropped += 1;
                            let r = Reject::for_conversation(
                                &c,
                                reason::TOO_LONG,
                                format!(
                                    "{} tokens > --seq-len {} (use --too-long truncate to keep the start)",
                                    sample.len(),
                                    opts.seq_len
                                ),
                            );
                            front.reject(r)?;
                            continue;
                        }
                        TooLong::Truncate => {
                            sample.input_ids.truncate(opts.seq_len);
                            sample.labels.truncate(opts.seq_len);
                            if sample.trained() == 0 {
                                let r = Reject::for_conversation(
                                    &c,
                                    reason::PROMPT_TOO_LONG,
                                    format!(
                                        "the prompt alone fills --seq-len {}; nothing left to train on",
                                        opts.seq_len
                                    ),
                                );
                                front.reject(r)?;
                                continue;
                            }
                            truncated += 1;
                        }
                    }
                }
                front.counts.rows_kept += 1;
                to_pack.push((is_eval(&c.id, opts.seed, opts.eval_fraction), sample));
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
    let (rejects_file, duplicates_file) = front.finish()?;
    let counts = front.counts.clone();
    let sources = hashing.join().map_err(|_| anyhow::anyhow!("hashing thread panicked"))??;
    let samples = train.samples + eval.samples;
    let rows = train.rows + eval.rows;
    let tokens = train.tokens + eval.tokens;
    let trainable = train.trainable_tokens + eval.trainable_tokens;
    let fill = if rows == 0 { 0.0 } else { tokens as f64 / (rows as f64 * opts.seq_len as f64) };
    if !counts.balanced() {
        bail!("internal accounting error: {:?}", counts);
    }
    let manifest = json!({
        "format": "tunekit-shards",
        "format_version": 1,
        "tool": {"name": "tunekit", "version": crate::VERSION},
        "sources": sources.iter().map(|(p, h)| json!({"path": p, "sha256": h})).collect::<Vec<_>>(),
        "tokenizer": {
            "path": tok.path.display().to_string(),
            "sha256": tok.sha256,
            "vocab_size": tok.vocab_size,
            "special_tokens": Value::Object(tok.specials.clone()),
        },
        "template": {"name": template.name, "sha256": template.sha256},
        "seq_len": opts.seq_len,
        "packing": opts.pack,
        "loss": opts.loss,
        "too_long": opts.too_long,
        "seed": opts.seed,
        "eval_fraction": opts.eval_fraction,
        "dedup": &opts.dedup,
        "columns": crate::pack::shards::COLUMNS,
        "accounting": {
            "rows_read": counts.rows_read,
            "rejected": counts.rejected,
            "rejected_by_reason": &counts.rejected_by_reason,
            "duplicates_exact": counts.duplicates_exact,
            "duplicates_near": counts.duplicates_near,
            "dropped_too_long": dropped,
            "truncated": truncated,
            "samples": samples,
            "packed_rows": rows,
            "tokens": tokens,
            "trainable_tokens": trainable,
            "fill_ratio": fill,
        },
        "splits": {"train": &train, "eval": &eval},
    });
    write_manifest(&manifest_path, &manifest)?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(PrepareSummary {
        command: "prepare",
        method: PrepareMethod::Sft,
        out: opts.out.display().to_string(),
        manifest: manifest_path.display().to_string(),
        rows_per_s: counts.rows_read as f64 / seconds.max(1e-9),
        tokens_per_s: tokens_seen as f64 / seconds.max(1e-9),
        counts,
        truncated,
        dropped_too_long: dropped,
        samples,
        packed_rows: rows,
        tokens,
        trainable_tokens: trainable,
        fill_ratio: fill,
        train,
        eval,
        rejects_file,
        duplicates_file,
        seconds,
    })
}

impl PrepareSummary {
    pub fn print_human(&self) {
        let c = &self.counts;
        println!(
            "prepared {} row(s) in {:.2}s ({:.0} rows/s, {:.0} tokens/s)",
            c.rows_read, self.seconds, self.rows_per_s, self.tokens_per_s
        );
        println!("  samples:    {} ({} train, {} eval)", self.samples, self.train.samples, self.eval.samples);
        println!("  duplicates: {} exact, {} near", c.duplicates_exact, c.duplicates_near);
        println!("  rejected:   {}", c.rejected);
        for (r, n) in &c.rejected_by_reason {
            println!("    {r}: {n}");
        }
        if self.truncated > 0 {
            println!("  truncated:  {}", self.truncated);
        }
        if self.method == PrepareMethod::Preference {
            println!("  pairs:      {} ({} tokens, chosen + rejected)", self.samples, self.tokens);
        } else {
            println!(
                "  packed:     {} row(s), {} tokens, {} trained ({:.1}%), fill {:.1}%",
                self.packed_rows,
                self.tokens,
                self.trainable_tokens,
                100.0 * self.trainable_tokens as f64 / self.tokens.max(1) as f64,
                100.0 * self.fill_ratio
            );
        }
        println!(
            "  shards:     {} -> {}",
            self.out,
            [self.train.files.clone(), self.eval.files.clone()].concat().join(", ")
        );
        println!("  manifest:   {}", self.manifest);
        if let Some(f) = &self.rejects_file {
            println!("  rejects:    {f}");
        }
        if let Some(f) = &self.duplicates_file {
            println!("  duplicates: {f}");
        }
    }
}
