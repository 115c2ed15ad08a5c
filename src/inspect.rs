//! `tunekit inspect DIR`: what a shard directory holds. The manifest's accounting, the length
//! distribution of samples (terminal histogram + PNG), fill ratio, trainable share, and `--show N`
//! to decode a row with the trained spans highlighted.

use crate::pack::shards::{list_shards, read_rows};
use crate::tokenize::TokenizerInfo;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

#[derive(Debug, Serialize)]
pub struct InspectReport {
    pub command: &'static str,
    pub dir: String,
    pub manifest: Value,
    pub rows: u64,
    pub samples: u64,
    pub tokens: u64,
    pub trainable_tokens: u64,
    pub trainable_share: f64,
    pub fill_ratio: f64,
    pub seq_len: u64,
    pub sample_length: crate::export::validate::Distribution,
    pub histogram: Vec<(u64, u64)>,
    pub plot: Option<String>,
    pub shown: Option<ShownRow>,
}

#[derive(Debug, Serialize)]
pub struct ShownRow {
    pub row: usize,
    pub split: String,
    pub seq_lengths: Vec<i32>,
    /// The decoded row with trained text between ⟦ and ⟧.
    pub text: String,
}

pub fn run(
    dir: &Path,
    show: Option<usize>,
    split: &str,
    tokenizer: Option<&Path>,
    plot: Option<PathBuf>,
) -> Result<InspectReport> {
    let mpath = dir.join("manifest.json");
    if !mpath.exists() {
        bail!(
            "{}: no manifest.json; this is not a complete tunekit shard directory (prepare writes the manifest last)",
            dir.display()
        );
    }
    let manifest: Value = serde_json::from_slice(&std::fs::read(&mpath)?)
        .with_context(|| format!("{}: invalid JSON", mpath.display()))?;
    let seq_len = manifest["seq_len"].as_u64().unwrap_or(0);
    let mut lengths: Vec<f64> = Vec::new();
    let (mut rows, mut tokens, mut trained) = (0u64, 0u64, 0u64);
    let mut shown = None;
    for sp in ["train", "eval"] {
        for f in list_shards(dir, sp)? {
            let data = read_rows(&f)?;
            for r in &data {
                rows += 1;
                tokens += r.input_ids.len() as u64;
                trained += r.labels.iter().filter(|&&l| l != -100).count() as u64;
                lengths.extend(r.seq_lengths.iter().map(|&l| l as f64));
            }
        }
    }
    if let Some(n) = show {
        let files = list_shards(dir, split)?;
        let mut seen = 0usize;
        for f in files {
            let data = read_rows(&f)?;
            if n < seen + data.len() {
                let row = &data[n - seen];
                let tok_path = match tokenizer {
                    Some(t) => t.to_path_buf(),
                    None => PathBuf::from(manifest["tokenizer"]["path"].as_str().unwrap_or_default()),
                };
                let tok = TokenizerInfo::load(&tok_path)
                    .with_context(|| "decoding a row needs the tokenizer; pass --tokenizer")?;
                shown = Some(ShownRow {
                    row: n,
                    split: split.to_string(),
                    seq_lengths: row.seq_lengths.clone(),
                    text: decode_marked(&tok, &row.input_ids, &row.labels, false)?,
                });
                break;
            }
            seen += data.len();
        }
        if shown.is_none() {
            bail!("row {n} does not exist in the {split} split ({seen} rows)");
        }
    }
    let samples = lengths.len() as u64;
    let (edges, counts) = histogram(&lengths, 20);
    let hist: Vec<(u64, u64)> = edges.iter().zip(&counts).map(|(e, c)| (*e as u64, *c)).collect();
    let plot_path = plot.unwrap_or_else(|| dir.join("lengths.png"));
    let plot = if samples > 0 {
        crate::plot::histogram_png(&plot_path, &edges, &counts)?;
        Some(plot_path.display().to_string())
    } else {
        None
    };
    Ok(InspectReport {
        command: "inspect",
        dir: dir.display().to_string(),
        rows,
        samples,
        tokens,
        trainable_tokens: trained,
        trainable_share: trained as f64 / tokens.max(1) as f64,
        fill_ratio: if rows == 0 || seq_len == 0 { 0.0 } else { tokens as f64 / (rows * seq_len) as f64 },
        seq_len,
        sample_length: crate::export::validate::Distribution::of(&mut lengths),
        histogram: hist,
        plot,
        shown,
        manifest,
    })
}

fn histogram(values: &[f64], bins: usize) -> (Vec<f64>, Vec<u64>) {
    if values.is_empty() {
        return (vec![], vec![]);
    }
    let max = values.iter().cloned().fold(0.0, f64::max).max(1.0);
    let width = (max / bins as f64).ceil().max(1.0);
    let mut counts = vec![0u64; bins];
    for &v in values {
        counts[((v / width) as usize).min(bins - 1)] += 1;
    }
    ((0..bins).map(|i| i as f64 * width).collect(), counts)
}

/// Decodes tokens, marking trained runs: ANSI colour on a terminal, ⟦ ⟧ otherwise.
pub fn decode_marked(tok: &TokenizerInfo, ids: &[i32], labels: &[i32], colour: bool) -> Result<String> {
    let (open, close) = if colour { ("\x1b[42;30m", "\x1b[0m") } else { ("⟦", "⟧") };
    let mut out = String::new();
    let mut i = 0;
    while i < ids.len() {
        let trained = labels[i] != -100;
        let mut j = i;
        while j < ids.len() && (labels[j] != -100) == trained {
            j += 1;
        }
        let run: Vec<u32> = ids[i..j].iter().map(|&t| t as u32).collect();
        let text = tok.tokenizer.decode(&run, false).map_err(|e| anyhow::anyhow!("decode: {e}"))?;
        if trained {
            out.push_str(open);
            out.push_str(&text);
            out.push_str(close);
        } else {
            out.push_str(&text);
        }
        i = j;
    }
    Ok(out)
}

impl InspectReport {
    pub fn print_human(&self) {
        let a = &self.manifest["accounting"];
        println!(
            "{}: {} rows, {} samples, {} tokens (seq_len {})",
            self.dir, self.rows, self.samples, self.tokens, self.seq_len
        );
        println!(
            "  source rows {} -> kept {}, rejected {}, duplicates {} exact + {} near, too long {}",
            a["rows_read"],
            a["samples"],
            a["rejected"],
            a["duplicates_exact"],
            a["duplicates_near"],
            a["dropped_too_long"]
        );
        if let Some(by) = a["rejected_by_reason"].as_object() {
            for (r, n) in by {
                println!("    {r}: {n}");
            }
        }
        println!("  fill ratio {:.1}%, trainable tokens {:.1}%", 100.0 * self.fill_ratio, 100.0 * self.trainable_share);
        let d = &self.sample_length;
        println!(
            "  sample length: min {} / median {} / mean {:.0} / p95 {:.0} / max {}",
            d.min, d.median, d.mean, d.p95, d.max
        );
        let max = self.histogram.iter().map(|h| h.1).max().unwrap_or(1).max(1);
        for (edge, n) in &self.histogram {
            let bar = "█".repeat(((*n as f64 / max as f64) * 40.0).round() as usize);
            println!("  {edge:>7} | {bar} {n}");
        }
        if let Some(p) = &self.plot {
            println!("  plot: {p}");
        }
        if let Some(s) = &self.shown {
            println!(
                "\n{} row {} (segments {:?}); trained text {}:\n",
                s.split,
                s.row,
                s.seq_lengths,
                if std::io::stdout().is_terminal() { "highlighted" } else { "between ⟦ ⟧" }
            );
            if std::io::stdout().is_terminal() {
                println!("{}", s.text.replace('⟦', "\x1b[42;30m").replace('⟧', "\x1b[0m"));
            } else {
                println!("{}", s.text);
            }
        }
    }
}
