//! `tunekit export openai`: canonical conversations (or any raw input) to OpenAI fine-tuning JSONL,
//! after the same admission as prepare (rejects, dedup), with an optional validation split. Examples
//! over the model's token limit are dropped or shortened and counted; files roll over before the
//! platform's upload size limit.

use crate::accounting::{Reject, Tally};
use crate::admit::Front;
use crate::commands::Summary;
use crate::dedup::DedupOptions;
use crate::export::openai::{fit_example, validation_path, ExportMethod, OverLimit, RollingJsonl};
use crate::export::tokens::ModelSpec;
use crate::ingest::{stream_conversations, MapOptions};
use crate::record::Conversation;
use crate::split::is_eval;
use anyhow::Result;
use rayon::prelude::*;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct ExportOptions {
    pub inputs: Vec<PathBuf>,
    pub out: PathBuf,
    pub map: MapOptions,
    pub strict: bool,
    pub method: ExportMethod,
    pub model: ModelSpec,
    pub over_limit: OverLimit,
    pub eval_fraction: f64,
    pub seed: u64,
    pub dedup: DedupOptions,
    /// Largest file written; the platform accepts up to 512 MB per upload.
    pub max_file_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct ExportSummary {
    pub command: &'static str,
    pub method: ExportMethod,
    pub model: ModelSpec,
    #[serde(flatten)]
    pub tally: Tally,
    pub truncated: u64,
    pub train_examples: u64,
    pub validation_examples: u64,
    pub train_files: Vec<String>,
    pub validation_files: Vec<String>,
    pub tokens: u64,
}

pub fn run(opts: &ExportOptions) -> Result<ExportSummary> {
    let start = Instant::now();
    let dir = opts.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let mut train = RollingJsonl::new(opts.out.clone(), opts.max_file_bytes);
    let mut valid = RollingJsonl::new(validation_path(&opts.out), opts.max_file_bytes);
    let mut front = Front::new(&dir, &opts.dedup, opts.strict, true);
    let (mut truncated, mut tokens) = (0u64, 0u64);
    let pb = crate::progress::rows("export");
    stream_conversations(&opts.inputs, &opts.map, |batch| {
        let kept = front.admit(batch.items)?;
        type Out = Result<(Vec<u8>, usize, bool), (&'static str, String)>;
        let lines: Vec<(Conversation, Out)> = kept
            .into_par_iter()
            .map(|c| {
                let res = fit_example(&c, opts.method, &opts.model, opts.over_limit);
                (c, res)
            })
            .collect();
        for (c, res) in lines {
            match res {
                Ok((mut bytes, n, was_truncated)) => {
                    bytes.push(b'\n');
                    front.counts.keep(&c.id);
                    tokens += n as u64;
                    truncated += was_truncated as u64;
                    if is_eval(&c.id, opts.seed, opts.eval_fraction) {
                        valid.write(&bytes)?;
                    } else {
                        train.write(&bytes)?;
                    }
                }
                Err((reason, detail)) => front.reject(Reject::for_conversation(&c, reason, detail))?,
            }
        }
        pb.set_position(front.counts.rows_read);
        Ok(())
    })?;
    pb.finish_and_clear();
    let (train_examples, validation_examples) = (train.lines, valid.lines);
    let train_files = train.finish()?;
    let validation_files = valid.finish()?;
    let files = front.finish()?;
    let tally = Tally::new(front.counts.clone(), files, start);
    tally.verdict("export")?;
    if train_examples < crate::export::validate::MIN_EXAMPLES {
        crate::progress::warn(&format!("only {train_examples} training example(s); OpenAI requires at least 10"));
    }
    Ok(ExportSummary {
        command: "export",
        method: opts.method,
        model: opts.model.clone(),
        tally,
        truncated,
        train_examples,
        validation_examples,
        train_files,
        validation_files,
        tokens,
    })
}

impl Summary for ExportSummary {
    fn print_human(&self) {
        println!("exported {} for {} ({:?})", self.tally.rate(), self.model.model, self.method);
        println!("  train:      {} example(s) -> {}", self.train_examples, self.train_files.join(", "));
        if self.validation_examples > 0 {
            println!("  validation: {} example(s) -> {}", self.validation_examples, self.validation_files.join(", "));
        }
        println!("  tokens:     {} ({:?})", self.tokens, self.model.encoding);
        if self.truncated > 0 {
            println!("  truncated:  {}", self.truncated);
        }
        self.tally.print_human();
    }
}
