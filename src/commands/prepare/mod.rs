//! `tunekit prepare`: the main job. One streaming pass of convert -> admit (count, reject, dedup) ->
//! tokenize with loss masks -> split -> pack -> Parquet shards, then `manifest.json` (written last: a
//! directory without it is incomplete). [`sft`] packs samples into rows; [`preference`] writes one
//! chosen/rejected pair per row; [`kto`] one labelled conversation per row; [`prompts`] writes
//! prompts for online RL.

pub mod kto;
pub mod preference;
pub mod prompts;
pub mod sft;

use super::Summary;
use crate::accounting::Tally;
use crate::admit::Front;
use crate::dedup::DedupOptions;
use crate::ingest::MapOptions;
use crate::pack::fit::TooLong;
use crate::pack::manifest::{
    Manifest, ManifestAccounting, ShardKind, SourceFile, SplitStats, Splits, TemplateRecord, TokenizerRecord, Tool,
};
use crate::pack::rows::PackMode;
use crate::template::chat::ChatTemplate;
use crate::tokenize::{LossMode, TokenizerInfo};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PrepareMethod {
    /// Packed SFT shards (input_ids, labels, position_ids, seq_lengths).
    Sft,
    /// Preference shards for DPO / reward models: one pair per row, answers trained.
    Preference,
    /// Unpaired preference shards for KTO: one conversation per row with a desirable/undesirable
    /// label (a `label` column, or preference pairs split into their two answers).
    Kto,
    /// Prompt shards for online RL (GRPO, PPO): the conversation up to its last user turn with the
    /// generation prompt, and the row's other columns for reward functions.
    Prompts,
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

#[derive(Debug, Serialize)]
pub struct PrepareSummary {
    pub command: &'static str,
    pub method: PrepareMethod,
    pub out: String,
    pub manifest: String,
    #[serde(flatten)]
    pub tally: Tally,
    pub truncated: u64,
    pub dropped_too_long: u64,
    pub samples: u64,
    pub packed_rows: u64,
    pub tokens: u64,
    pub trainable_tokens: u64,
    pub fill_ratio: f64,
    pub train: SplitStats,
    pub eval: SplitStats,
    pub tokens_per_s: f64,
    /// merge-parts: the kept rows a rank had set aside as duplicates within its share, tokenized
    /// by the merge.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokenized_at_merge: Option<u64>,
    /// kto: the rows labelled desirable (the rest are undesirable).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desirable: Option<u64>,
}

pub fn run(opts: &PrepareOptions) -> Result<PrepareSummary> {
    if opts.map.share.is_some() {
        bail!("internal error: a sharded prepare runs through run_part");
    }
    let _lock = crate::output::DirLock::acquire(&opts.out, "tunekit prepare")?;
    match opts.method {
        PrepareMethod::Sft => sft::run(opts),
        PrepareMethod::Preference => preference::run(opts),
        PrepareMethod::Kto => kto::run(opts),
        PrepareMethod::Prompts => prompts::run(opts),
    }
}

/// One rank's part of a sharded prepare (`--rank/--world-size`, or an array task's environment).
pub fn run_part(opts: &PrepareOptions) -> Result<crate::commands::parts::PartSummary> {
    let share = opts.map.share.context("a part needs --rank and --world-size")?;
    if opts.method != PrepareMethod::Sft {
        bail!("a sharded prepare (--rank/--world-size) is --method sft only for now");
    }
    if opts.map.select.is_active() {
        bail!("--sql, --limit and --sample read the whole input as one table: run them in one process, not sharded");
    }
    sft::run_part(opts, share)
}

/// What both methods set up first: the options checked, the tokenizer and chat template loaded, the
/// output directory made and cleared of an earlier run's manifest.
struct Setup {
    tok: TokenizerInfo,
    template: ChatTemplate,
}

impl Setup {
    fn new(opts: &PrepareOptions) -> Result<Setup> {
        if opts.seq_len < 8 {
            bail!("--seq-len {} is too small", opts.seq_len);
        }
        if !(0.0..1.0).contains(&opts.eval_fraction) {
            bail!("--eval-fraction must be in [0, 1), got {}", opts.eval_fraction);
        }
        let tok = TokenizerInfo::load(&opts.tokenizer)?;
        let template = crate::tokenize::chat_template(&tok, opts.template.as_deref())?;
        std::fs::create_dir_all(&opts.out).with_context(|| format!("cannot create {}", opts.out.display()))?;
        // A re-run must not leave an old manifest that vouches for new, partial shards.
        Manifest::remove(&opts.out);
        Ok(Setup { tok, template })
    }

    /// The manifest of a run of `kind`: the parts every kind shares, filled from the options (the
    /// accounting and the splits are [`finish`]'s).
    fn manifest(&self, opts: &PrepareOptions, format: ShardKind, sources: Vec<SourceFile>) -> Manifest {
        Manifest {
            format,
            format_version: 1,
            method: None,
            tool: Tool::this(),
            sources,
            tokenizer: TokenizerRecord::of(&self.tok),
            template: TemplateRecord { name: self.template.name.clone(), sha256: self.template.sha256.clone() },
            seq_len: opts.seq_len,
            packing: None,
            loss: opts.loss,
            too_long: opts.too_long,
            seed: opts.seed,
            eval_fraction: opts.eval_fraction,
            dedup: opts.dedup.clone(),
            columns: vec![],
            accounting: ManifestAccounting::default(),
            splits: Splits::default(),
        }
    }
}

/// What a kind of prepare made, for [`finish`]: its figures beside the counts every kind shares.
struct Made {
    method: PrepareMethod,
    truncated: u64,
    dropped_too_long: u64,
    samples: u64,
    packed_rows: u64,
    tokens: u64,
    trainable_tokens: u64,
    fill_ratio: f64,
    /// The tokens tokenized, for the rate (more than `tokens` when rows were dropped).
    tokens_seen: u64,
    train: SplitStats,
    eval: SplitStats,
}

/// One split of a kind written one sample per row (pairs, labelled rows): its rows, tokens, trained
/// tokens and files.
struct Unpacked {
    rows: u64,
    tokens: u64,
    trained: u64,
    files: Vec<String>,
}

impl Made {
    /// What a kind written one sample per row made, from its splits.
    fn unpacked(method: PrepareMethod, truncated: u64, dropped: u64, train: Unpacked, eval: Unpacked) -> Made {
        let stats = |u: Unpacked| SplitStats {
            samples: u.rows,
            rows: u.rows,
            tokens: u.tokens,
            trainable_tokens: u.trained,
            fill_ratio: 0.0,
            files: u.files,
        };
        let (train, eval) = (stats(train), stats(eval));
        let samples = train.samples + eval.samples;
        let tokens = train.tokens + eval.tokens;
        Made {
            method,
            truncated,
            dropped_too_long: dropped,
            samples,
            packed_rows: samples,
            tokens,
            trainable_tokens: train.trainable_tokens + eval.trainable_tokens,
            fill_ratio: 0.0,
            tokens_seen: tokens,
            train,
            eval,
        }
    }

    /// The manifest's accounting of what was made, on top of the counts every kind shares.
    fn accounting(&self) -> impl Fn(ManifestAccounting) -> ManifestAccounting {
        let (truncated, tokens, trainable_tokens) = (self.truncated, self.tokens, self.trainable_tokens);
        move |shared| ManifestAccounting {
            truncated: (truncated > 0).then_some(truncated),
            tokens,
            trainable_tokens,
            ..shared
        }
    }
}

/// How every kind of prepare ends: the admission front closed and its counts checked, the
/// accounting (`account` adds the kind's own figures to the shared counts) and the splits in the
/// manifest, the manifest written last (it vouches for complete shards), the report beside the
/// shards, the verdict (a run that keeps nothing is an error) and the summary.
fn finish(
    opts: &PrepareOptions,
    mut front: Front,
    mut manifest: Manifest,
    account: impl FnOnce(ManifestAccounting) -> ManifestAccounting,
    made: Made,
    start: Instant,
) -> Result<PrepareSummary> {
    let files = front.finish()?;
    let counts = front.counts.clone();
    if !counts.balanced() {
        bail!("internal accounting error: {counts:?}");
    }
    manifest.accounting = account(ManifestAccounting::of(&counts, made.dropped_too_long));
    manifest.splits = Splits { train: made.train.clone(), eval: made.eval.clone() };
    manifest.write(&opts.out)?;
    crate::report::html::write_beside(&opts.out);
    let tally = Tally::new(counts, files, start);
    tally.verdict("prepare")?;
    Ok(PrepareSummary {
        command: "prepare",
        method: made.method,
        out: opts.out.display().to_string(),
        manifest: manifest_path(&opts.out),
        tokens_per_s: made.tokens_seen as f64 / tally.seconds.max(1e-9),
        tally,
        truncated: made.truncated,
        dropped_too_long: made.dropped_too_long,
        samples: made.samples,
        packed_rows: made.packed_rows,
        tokens: made.tokens,
        trainable_tokens: made.trainable_tokens,
        fill_ratio: made.fill_ratio,
        train: made.train,
        eval: made.eval,
        tokenized_at_merge: None,
        desirable: None,
    })
}

/// The sha256 of every input, on a thread of its own (the inputs are read again meanwhile).
fn hash_sources(inputs: &[PathBuf]) -> std::thread::JoinHandle<Result<Vec<SourceFile>>> {
    let inputs = inputs.to_vec();
    std::thread::spawn(move || {
        inputs
            .iter()
            .map(|p| Ok(SourceFile { path: p.display().to_string(), sha256: crate::digest::sha256_file(p)? }))
            .collect()
    })
}

fn joined<T>(h: std::thread::JoinHandle<Result<T>>, what: &str) -> Result<T> {
    h.join().map_err(|_| anyhow::anyhow!("{what} thread panicked"))?
}

fn manifest_path(out: &Path) -> String {
    out.join(crate::pack::manifest::FILE).display().to_string()
}

impl Summary for PrepareSummary {
    fn print_human(&self) {
        let t = &self.tally;
        println!("prepared {}, {:.0} tokens/s", t.rate(), self.tokens_per_s);
        println!("  samples:    {} ({} train, {} eval)", self.samples, self.train.samples, self.eval.samples);
        t.print_human();
        if self.truncated > 0 {
            println!("  truncated:  {}", self.truncated);
        }
        if self.method == PrepareMethod::Preference {
            println!("  pairs:      {} ({} tokens, chosen + rejected)", self.samples, self.tokens);
        } else if let (PrepareMethod::Kto, Some(d)) = (self.method, self.desirable) {
            println!(
                "  labelled:   {} row(s), {d} desirable, {} undesirable ({} tokens)",
                self.samples,
                self.samples - d,
                self.tokens
            );
        } else if self.method == PrepareMethod::Prompts {
            println!("  prompts:    {} ({} tokens)", self.samples, self.tokens);
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
        if let Some(n) = self.tokenized_at_merge.filter(|n| *n > 0) {
            println!("  merge:      tokenized {n} kept row(s) a rank had set aside as duplicates within its share");
        }
    }
}
