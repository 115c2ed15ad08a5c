//! One self-contained HTML report (`tunekit report DIR...`): no network, no scripts, the charts
//! inline as SVG. For shard directories: the accounting, the sample-length histogram, rows by
//! reject reason, a few rows decoded with the trained text highlighted, examples of each reject
//! and duplicate reason. For run directories: training and held-out loss (raw and smoothed),
//! learning rate, gradient norm, throughput, memory and every other metric the method logs
//! (rewards, margins, accuracies, KL), several runs overlaid; the options the run used; and its
//! benchmark results when `tunekit bench` left them ([`super::bench`]).

pub use super::charts::escape;
use super::charts::{bar_chart, line_chart, loss_series, Series};
use super::stats::{bars, binned, histogram};
use crate::pack::manifest::{Manifest, ManifestAccounting, ShardKind};
use crate::pack::rows::PackedRow;
use crate::pack::shards::{list_shards, read_first_rows, read_seq_lengths};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

const STYLE: &str = "body{font-family:sans-serif;max-width:1360px;margin:24px auto;padding:0 16px;color:#222}\
h1{font-size:24px}h2{font-size:20px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}\
h3{font-size:16px}table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;font-size:13px}\
.charts{display:flex;flex-wrap:wrap;gap:12px}.charts svg{border:1px solid #eee}\
pre{background:#f6f6f6;padding:8px;white-space:pre-wrap;font-size:12px;max-height:420px;overflow:auto}\
mark{background:#c8f7c5}";

/// Each metric of a run with its (step, value) points.
type Curves = BTreeMap<String, Vec<(f64, f64)>>;

/// A run's metrics.jsonl as curves.
fn run_metrics(dir: &Path) -> Result<Curves> {
    let p = dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    let mut m: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let rec: Value =
            serde_json::from_str(line).with_context(|| format!("{} line {}: not JSON", p.display(), i + 1))?;
        let Some(step) = rec["step"].as_f64() else { continue };
        for (k, v) in rec.as_object().into_iter().flatten() {
            if let (Some(x), true) = (v.as_f64(), k != "step") {
                m.entry(k.clone()).or_default().push((step, x));
            }
        }
    }
    Ok(m)
}

/// What each chart of a run shows: (title, y axis, the metrics drawn).
const RUN_CHARTS: &[(&str, &str, &[&str])] = &[
    ("Learning rate", "learning rate", &["lr"]),
    ("Gradient norm", "norm (before clipping)", &["grad_norm"]),
    ("Throughput", "tokens / s", &["tokens_per_s"]),
    ("Memory", "peak resident MB", &["peak_memory_mb", "gpu_memory_mb"]),
    ("Expert load", "busiest expert's share / even share", &["expert_imbalance"]),
];

/// Whether metric `key` is drawn as `k` of a chart: itself, or one of its per-layer curves
/// (`expert_imbalance_layer_3`).
fn drawn_as(key: &str, k: &str) -> bool {
    key == k || key.strip_prefix(k).is_some_and(|rest| rest.starts_with("_layer_"))
}

/// The part of a report for the run directories `runs` (several are overlaid).
fn runs_section(runs: &[&Path], out: &mut String) -> Result<()> {
    let metrics: Vec<(String, Curves)> =
        runs.iter().map(|d| Ok((d.display().to_string(), run_metrics(d)?))).collect::<Result<_>>()?;
    let label = |run: &str, what: &str| if runs.len() > 1 { format!("{run}: {what}") } else { what.to_string() };
    writeln!(out, "<h2>Training runs</h2><table><tr><th>run</th><th>steps</th><th>first loss</th><th>last loss</th><th>last eval loss</th></tr>")?;
    for (name, m) in &metrics {
        let last = |k: &str| m.get(k).and_then(|v| v.last()).map_or("-".into(), |p| format!("{:.4}", p.1));
        let first = m.get("loss").and_then(|v| v.first()).map_or("-".into(), |p| format!("{:.4}", p.1));
        let steps = m.values().flat_map(|v| v.iter().map(|p| p.0)).fold(0.0, f64::max);
        writeln!(
            out,
            "<tr><td>{}</td><td>{steps}</td><td>{first}</td><td>{}</td><td>{}</td></tr>",
            escape(name),
            last("loss"),
            last("eval_loss")
        )?;
    }
    writeln!(out, "</table><div class=\"charts\">")?;
    let mut loss = vec![];
    for (name, m) in &metrics {
        let train = m.get("loss").map_or(&[][..], |v| &v[..]);
        loss.extend(loss_series(|w| label(name, w), train, m.get("eval_loss").map(|e| ("eval_loss", &e[..]))));
    }
    if !loss.is_empty() {
        out.push_str(&line_chart("Loss", "step", "loss (nats per trained token)", &loss)?);
    }
    let mut shown: Vec<&str> = vec![
        "loss",
        "eval_loss",
        "tokens",
        "trained_tokens",
        "step_time",
        "rows_per_s",
        "pairs_per_s",
        "prompts_per_s",
    ];
    for (title, y, keys) in RUN_CHARTS {
        shown.extend(keys.iter());
        let series: Vec<Series> = metrics
            .iter()
            .flat_map(|(name, m)| {
                m.iter()
                    .filter(|(key, _)| keys.iter().any(|k| drawn_as(key, k)))
                    .map(move |(key, p)| Series { name: label(name, key), points: p.clone() })
            })
            .collect();
        if !series.is_empty() {
            out.push_str(&line_chart(title, "step", y, &series)?);
        }
    }
    // Every other metric the method logs (DPO margins and accuracies, RL rewards and KL, ...).
    let mut others: Vec<&String> =
        metrics.iter().flat_map(|(_, m)| m.keys()).filter(|k| !shown.iter().any(|s| drawn_as(k, s))).collect();
    others.sort();
    others.dedup();
    for k in others {
        let series: Vec<Series> = metrics
            .iter()
            .filter_map(|(name, m)| m.get(k).map(|p| Series { name: label(name, k), points: p.clone() }))
            .collect();
        out.push_str(&line_chart(k, "step", k, &series)?);
    }
    writeln!(out, "</div>")?;
    for d in runs {
        let state = d.join("checkpoint-last/state.json");
        if let Ok(s) = std::fs::read(&state) {
            let v: Value = serde_json::from_slice(&s).unwrap_or_default();
            let opts = serde_json::to_string_pretty(&v["options"]).unwrap_or_default();
            writeln!(
                out,
                "<details><summary>options of {}</summary><pre>{}</pre></details>",
                escape(&d.display().to_string()),
                escape(&opts)
            )?;
        }
    }
    Ok(())
}

/// The side files of a shard directory: (file, the key its examples are grouped by, the key that
/// names each record's source, the report's heading).
const SIDE_FILES: [(&str, &str, &str, &str); 3] = [
    ("rejects.jsonl", "reason", "source", "Rejects"),
    ("duplicates.jsonl", "kind", "id", "Duplicates"),
    ("contaminated.jsonl", "eval_row", "source", "Contaminated"),
];

/// What a report shows of one side file, from one pass over it: the first `n` lines for each value
/// of the example key, and the records per source (a `<source>:<row>` id counts under its source).
#[derive(Default)]
struct SideSummary {
    examples: BTreeMap<String, Vec<String>>,
    by_source: BTreeMap<String, u64>,
}

fn read_side(path: &Path, example_key: &str, source_key: &str, n: usize) -> SideSummary {
    let mut sum = SideSummary::default();
    let Ok(text) = std::fs::read_to_string(path) else { return sum };
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else { continue };
        let e = sum.examples.entry(v[example_key].as_str().unwrap_or("").to_string()).or_default();
        if e.len() < n {
            e.push(line.to_string());
        }
        let s = v[source_key].as_str().unwrap_or("");
        let s = if source_key == "id" { s.rsplit_once(':').map_or(s, |p| p.0) } else { s };
        *sum.by_source.entry(s.to_string()).or_default() += 1;
    }
    sum
}

/// Each source's rows: kept (from the manifest), then rejected, duplicates and contaminated (from
/// the side files' summaries, in [`SIDE_FILES`] order).
fn rows_by_source(m: &Manifest, sides: &[SideSummary]) -> BTreeMap<String, [u64; 4]> {
    let mut by: BTreeMap<String, [u64; 4]> = BTreeMap::new();
    for (s, n) in &m.accounting.kept_by_source {
        by.entry(s.clone()).or_default()[0] = *n;
    }
    for (k, side) in sides.iter().enumerate() {
        for (s, n) in &side.by_source {
            by.entry(s.clone()).or_default()[k + 1] += n;
        }
    }
    by
}

fn file_name(path: &str) -> String {
    Path::new(path).file_name().map_or(path.to_string(), |f| f.to_string_lossy().to_string())
}

/// What a report samples from a shard directory's train split: the sequence lengths (SFT samples,
/// preference sides or prompts) under their chart's title and, for SFT rows, each row's trained
/// share (first 2,000 rows) and the first rows to decode.
struct Sampled {
    title: &'static str,
    lengths: Vec<f64>,
    shares: Vec<f64>,
    rows: Vec<PackedRow>,
}

fn sample(dir: &Path, m: &Manifest) -> Result<Sampled> {
    let mut s = Sampled { title: "Sample length", lengths: vec![], shares: vec![], rows: vec![] };
    match m.format {
        ShardKind::Preference => {
            s.title = "Chosen and rejected lengths";
            let f = dir.join(crate::pack::shards::single_shard_file_name("train"));
            if f.exists() {
                for p in crate::pack::preference::read_pairs(&f)? {
                    s.lengths.push(p.chosen_input_ids.len() as f64);
                    s.lengths.push(p.rejected_input_ids.len() as f64);
                }
            }
        }
        ShardKind::Unpaired => {
            s.title = "Labelled conversation length";
            let f = dir.join(crate::pack::shards::single_shard_file_name("train"));
            if f.exists() {
                s.lengths.extend(crate::pack::unpaired::read_unpaired(&f)?.iter().map(|r| r.input_ids.len() as f64));
            }
        }
        ShardKind::Prompts => {
            s.title = "Prompt length";
            for f in list_shards(dir, "train")? {
                s.lengths.extend(crate::pack::prompts::read_prompts(&f)?.iter().map(|p| p.prompt_ids.len() as f64));
            }
        }
        _ => {
            let files = list_shards(dir, "train")?;
            for f in &files {
                s.lengths.extend(read_seq_lengths(f)?.into_iter().flatten().map(|l| l as f64));
            }
            // The rows shown come from the first shard only.
            if let Some(f) = files.first() {
                let head = read_first_rows(f, 2000)?;
                s.shares = head
                    .iter()
                    .map(|r| r.labels.iter().filter(|&&l| l != -100).count() as f64 / r.labels.len().max(1) as f64)
                    .collect();
                s.rows = head.into_iter().take(3).collect();
            }
        }
    }
    Ok(s)
}

/// The accounting table and the line naming the tokenizer, template, length and loss.
fn accounting_table(m: &Manifest, out: &mut String) -> Result<()> {
    let a = &m.accounting;
    writeln!(out, "<table><tr><th>rows read</th><th>kept samples</th><th>rejected</th><th>duplicates (exact / near)</th><th>filtered</th><th>contaminated</th><th>too long</th><th>tokens</th><th>trained tokens</th><th>fill</th></tr>")?;
    writeln!(
        out,
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{} / {}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} ({:.1}%)</td><td>{:.1}%</td></tr></table>",
        a.rows_read,
        a.samples.or(a.pairs).or(a.prompts).unwrap_or(0),
        a.rejected,
        a.duplicates_exact,
        a.duplicates_near,
        a.filtered,
        a.contaminated,
        a.dropped_too_long,
        a.tokens,
        a.trainable_tokens,
        100.0 * a.trainable_tokens as f64 / a.tokens.max(1) as f64,
        100.0 * a.fill_ratio.unwrap_or(0.0)
    )?;
    writeln!(
        out,
        "<p>tokenizer {} · template {} · seq_len {} · loss {:?}</p>",
        escape(&m.tokenizer.path),
        escape(&m.template.name),
        m.seq_len,
        m.loss
    )?;
    Ok(())
}

/// The rows not kept, by reason: every reject reason, the duplicates, filtered and contaminated.
fn fates(a: &ManifestAccounting) -> Vec<(String, f64)> {
    let mut fates: Vec<(String, f64)> = a.rejected_by_reason.iter().map(|(r, n)| (r.clone(), *n as f64)).collect();
    for (name, n) in [
        ("duplicate (exact)", a.duplicates_exact),
        ("duplicate (near)", a.duplicates_near),
        ("filtered", a.filtered),
        ("contaminated", a.contaminated),
    ] {
        if n > 0 {
            fates.push((name.into(), n as f64));
        }
    }
    fates
}

/// Each source's rows: kept, rejected, duplicates, contaminated.
fn sources_table(sources: &BTreeMap<String, [u64; 4]>, out: &mut String) -> Result<()> {
    writeln!(out, "<h3>Rows by source</h3><table><tr><th>source</th><th>kept</th><th>rejected</th><th>duplicates</th><th>contaminated</th></tr>")?;
    for (s, n) in sources {
        let [kept, rejected, duplicates, contaminated] = n;
        writeln!(
            out,
            "<tr><td>{}</td><td>{kept}</td><td>{rejected}</td><td>{duplicates}</td><td>{contaminated}</td></tr>",
            escape(s)
        )?;
    }
    writeln!(out, "</table>")?;
    Ok(())
}

/// The first rows decoded, the trained text highlighted (when the shards' tokenizer is still there).
fn decoded_rows(m: &Manifest, rows: &[PackedRow], out: &mut String) -> Result<()> {
    let Ok(tok) = crate::tokenize::TokenizerInfo::load(Path::new(&m.tokenizer.path)) else { return Ok(()) };
    if rows.is_empty() {
        return Ok(());
    }
    writeln!(out, "<h3>Rows as the model sees them (trained text highlighted)</h3>")?;
    for (i, r) in rows.iter().enumerate() {
        let text = crate::tokenize::decode::decode_marked(&tok, &r.input_ids, &r.labels, false)?;
        let html = escape(&text).replace('⟦', "<mark>").replace('⟧', "</mark>");
        writeln!(
            out,
            "<details{}><summary>train row {i} ({} tokens, {} segments)</summary><pre>{html}</pre></details>",
            if i == 0 { " open" } else { "" },
            r.input_ids.len(),
            r.seq_lengths.len()
        )?;
    }
    Ok(())
}

/// The part of a report for one shard directory: the accounting, the charts of lengths, trained
/// shares, rows not kept and rows by source, the decoded rows, and examples of each side file.
fn shards_section(dir: &Path, out: &mut String) -> Result<()> {
    let m = Manifest::read(dir)?;
    writeln!(out, "<h2>Shards: {}</h2>", escape(&dir.display().to_string()))?;
    accounting_table(&m, out)?;
    writeln!(out, "<div class=\"charts\">")?;
    let s = sample(dir, &m)?;
    if !s.lengths.is_empty() {
        let bars = bars(histogram(&s.lengths, 24), |e| format!("{e:.0}"));
        out.push_str(&bar_chart(s.title, "tokens (bin start)", "sequences", &bars)?);
    }
    if !s.shares.is_empty() {
        let bars = bars(binned(&s.shares, 20, 0.05), |e| format!("{:.0}%", e * 100.0));
        let title = "Trained share of each row (first 2,000 rows)";
        out.push_str(&bar_chart(title, "trained tokens / tokens (bin start)", "rows", &bars)?);
    }
    let fates = fates(&m.accounting);
    if !fates.is_empty() {
        out.push_str(&bar_chart("Rows not kept, by reason", "reason", "rows", &fates)?);
    }
    let sides: Vec<SideSummary> =
        SIDE_FILES.iter().map(|(f, ex, src, _)| read_side(&dir.join(f), ex, src, 2)).collect();
    let sources = rows_by_source(&m, &sides);
    if !sources.is_empty() {
        let bars: Vec<(String, f64)> = sources.iter().map(|(s, n)| (file_name(s), n[0] as f64)).collect();
        out.push_str(&bar_chart("Kept rows by source", "source file", "rows kept", &bars)?);
    }
    writeln!(out, "</div>")?;
    if !sources.is_empty() {
        sources_table(&sources, out)?;
    }
    decoded_rows(&m, &s.rows, out)?;
    for ((_, key, _, what), side) in SIDE_FILES.iter().zip(&sides) {
        if side.examples.is_empty() {
            continue;
        }
        writeln!(out, "<h3>{what}: examples by {key}</h3>")?;
        for (k, lines) in side.examples.iter().take(20) {
            writeln!(out, "<p><b>{}</b></p><pre>{}</pre>", escape(k), escape(&lines.join("\n")))?;
        }
    }
    Ok(())
}

/// Writes `dir/report.html` for one shard or run directory (what prepare and train leave beside
/// their outputs); returns its path. The outputs are complete without it, so a report that cannot
/// be written is a warning, not a failure.
pub fn write_beside(dir: &Path) -> Option<std::path::PathBuf> {
    let write = || -> Result<std::path::PathBuf> {
        let html = report(&[dir])?;
        let p = dir.join("report.html");
        let mut f = crate::output::AtomicFile::create(&p)?;
        std::io::Write::write_all(&mut f, html.as_bytes())?;
        f.commit()?;
        Ok(p)
    };
    match write() {
        Ok(p) => Some(p),
        Err(e) => {
            crate::progress::warn(&format!("{}: no report.html: {e:#}", dir.display()));
            None
        }
    }
}

/// The whole report over shard and run directories.
pub fn report(dirs: &[&Path]) -> Result<String> {
    let mut body = String::new();
    let runs: Vec<&Path> = dirs.iter().copied().filter(|d| d.join("metrics.jsonl").exists()).collect();
    for d in dirs {
        if d.join(crate::pack::manifest::FILE).exists() {
            shards_section(d, &mut body)?;
        } else if !d.join("metrics.jsonl").exists() && !d.join("bench.json").exists() {
            bail!("{}: neither a shard directory (manifest.json) nor a training run (metrics.jsonl)", d.display());
        }
    }
    if !runs.is_empty() {
        runs_section(&runs, &mut body)?;
    }
    for d in dirs {
        super::bench::section(d, &mut body)?;
    }
    Ok(format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>tunekit report</title><style>{STYLE}</style></head>\n<body><h1>tunekit report</h1>\n<p>{}</p>\n{body}</body></html>\n",
        escape(&dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", "))
    ))
}
