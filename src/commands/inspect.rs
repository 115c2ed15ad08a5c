//! `tunekit inspect DIR`: what a shard directory holds. The manifest's accounting, the length
//! distribution of samples (terminal histogram + PNG), fill ratio, trainable share, and `--show N`
//! to decode a row with the trained spans highlighted.

use super::Summary;
use crate::pack::manifest::Manifest;
use crate::pack::shards::{list_shards, read_rows};
use crate::report::stats::{histogram, Distribution};
use crate::tokenize::decode::decode_marked;
use crate::tokenize::TokenizerInfo;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

#[derive(Debug, Serialize)]
pub struct InspectReport {
    pub command: &'static str,
    pub dir: String,
    pub manifest: Manifest,
    pub rows: u64,
    pub samples: u64,
    pub tokens: u64,
    pub trainable_tokens: u64,
    pub trainable_share: f64,
    pub fill_ratio: f64,
    pub seq_len: u64,
    pub sample_length: Distribution,
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
    let manifest = Manifest::read(dir)?;
    let seq_len = manifest.seq_len as u64;
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
                    None => PathBuf::from(&manifest.tokenizer.path),
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
        let bars: Vec<(String, f64)> = hist.iter().map(|(e, n)| (e.to_string(), *n as f64)).collect();
        crate::report::charts::bar_chart_png(&plot_path, "Sample length", "tokens (bin start)", "samples", &bars)?;
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
        sample_length: Distribution::of(&mut lengths),
        histogram: hist,
        plot,
        shown,
        manifest,
    })
}

impl Summary for InspectReport {
    fn print_human(&self) {
        let a = &self.manifest.accounting;
        println!(
            "{}: {} rows, {} samples, {} tokens (seq_len {})",
            self.dir, self.rows, self.samples, self.tokens, self.seq_len
        );
        println!(
            "  source rows {} -> kept {}, rejected {}, duplicates {} exact + {} near, too long {}",
            a.rows_read,
            a.samples.or(a.pairs).unwrap_or(0),
            a.rejected,
            a.duplicates_exact,
            a.duplicates_near,
            a.dropped_too_long
        );
        for (r, n) in &a.rejected_by_reason {
            println!("    {r}: {n}");
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
