//! `tunekit bench`: lm-evaluation-harness task files scored on a base model and each adapter, side
//! by side: every metric with its standard error, each adapter's difference from the base with the
//! paired standard error, documents where they disagree, per-document logs, and the results as
//! JSON (stdout with `--json`, `--out DIR`, and `bench.json` in each adapter's run directory).

use super::Summary;
use crate::bench::judge::Judges;
use crate::bench::metrics::{paired_difference, Estimate};
use crate::bench::prompt::Style;
use crate::bench::task::Task;
use crate::bench::{Prepared, Scores, Settings};
use crate::tokenize::TokenizerInfo;
use crate::train::io::{load_model, read_config, Placement};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct BenchOptions {
    pub model: PathBuf,
    pub adapters: Vec<PathBuf>,
    /// Score the adapters only, not the base.
    pub no_base: bool,
    pub tokenizer: Option<PathBuf>,
    pub tasks: Vec<PathBuf>,
    /// A shard directory whose eval split is answered and compared with its answers.
    pub held_out: Option<PathBuf>,
    pub max_new_tokens: usize,
    pub limit: Option<usize>,
    /// Overrides every task's num_fewshot.
    pub num_fewshot: Option<usize>,
    /// Render contexts with the chat template (this name or file, or the tokenizer's own).
    pub chat_template: Option<Option<String>>,
    pub fewshot_as_multiturn: bool,
    pub max_length: Option<usize>,
    pub batch_tokens: usize,
    pub seed: u64,
    pub out: Option<PathBuf>,
    pub placement: Placement,
}

/// A model scored: the base or the base with one adapter.
#[derive(Debug, Serialize)]
pub struct Subject {
    pub name: String,
    pub adapter: Option<PathBuf>,
    pub seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct MetricRow {
    /// lm-eval's key: `metric,filter`.
    pub key: String,
    /// One per subject, in order.
    pub values: Vec<Estimate>,
    /// Each subject after the first minus the first, paired over documents.
    pub differences: Vec<Estimate>,
}

#[derive(Debug, Serialize)]
pub struct TaskResult {
    pub task: String,
    pub file: PathBuf,
    pub output_type: String,
    pub num_fewshot: usize,
    pub documents: usize,
    pub metrics: Vec<MetricRow>,
    /// Documents where the first subject and another disagree on the first metric (a few).
    pub disagreements: Vec<Value>,
}

#[derive(Debug, Serialize)]
pub struct BenchSummary {
    pub command: &'static str,
    pub model: PathBuf,
    pub subjects: Vec<Subject>,
    pub tasks: Vec<TaskResult>,
    pub max_length: usize,
    pub chat_template: bool,
    pub seconds: f64,
    pub out: Option<PathBuf>,
}

/// Examples of disagreement kept per task and subject.
const EXAMPLES: usize = 5;

pub fn run(o: &BenchOptions) -> Result<BenchSummary> {
    let started = Instant::now();
    // Everything that can be wrong with the tasks is found before a model loads.
    let mut tasks = o.tasks.iter().map(|t| Task::load(t)).collect::<Result<Vec<_>>>()?;
    if let Some(n) = o.num_fewshot {
        for t in &mut tasks {
            t.num_fewshot = n;
        }
    }
    let tok = TokenizerInfo::load(o.tokenizer.as_ref().unwrap_or(&o.model))?;
    let config = read_config(&o.model)?;
    if let Some(dir) = &o.held_out {
        crate::train::data::check_manifest(dir, config.vocab_size).context("--held-out")?;
        tasks.push(crate::bench::held_out::task(dir, &tok, o.max_new_tokens)?);
    }
    if tasks.is_empty() {
        bail!("no tasks: give task files with --tasks TASK.yaml, or shards with --held-out DIR");
    }
    let chat = match &o.chat_template {
        Some(name) => Some(crate::tokenize::chat_template(&tok, name.as_deref())?),
        None => None,
    };
    let max_length = o.max_length.unwrap_or(config.max_position_embeddings);
    let mut judges = Judges::new(&o.model, config.vocab_size, &o.placement);
    let settings = Settings {
        style: Style { chat: chat.as_ref(), fewshot_as_multiturn: o.fewshot_as_multiturn },
        max_length,
        seed: o.seed,
        limit: o.limit,
    };
    let prepared = tasks.iter().map(|t| Prepared::new(t, &tok, &settings)).collect::<Result<Vec<_>>>()?;

    let mut subjects: Vec<(String, Option<PathBuf>)> = vec![];
    if !o.no_base {
        subjects.push(("base".into(), None));
    }
    for a in &o.adapters {
        let mut name = a.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "adapter".into());
        if subjects.iter().any(|(n, _)| *n == name) {
            name = format!("{name}#{}", subjects.len());
        }
        subjects.push((name, Some(a.clone())));
    }
    if subjects.is_empty() {
        bail!("--no-base needs one or more --adapter");
    }

    // scores[subject][task]
    let mut scores: Vec<Vec<Scores>> = vec![];
    let mut done: Vec<Subject> = vec![];
    for (name, adapter) in &subjects {
        let t0 = Instant::now();
        let model = load_model(&o.model, adapter.as_deref(), &o.placement)?;
        let mut mine = vec![];
        for p in &prepared {
            let bar = crate::progress::bar(&format!("{name}: {}", p.task.name), p.units());
            mine.push(p.evaluate(&model, &tok, &settings, o.batch_tokens, &mut judges, &bar)?);
            bar.finish_and_clear();
        }
        scores.push(mine);
        done.push(Subject { name: name.clone(), adapter: adapter.clone(), seconds: t0.elapsed().as_secs_f64() });
    }

    let mut results = vec![];
    for (ti, p) in prepared.iter().enumerate() {
        let keys: Vec<String> = scores[0][ti].per_doc.keys().cloned().collect();
        let mut rows = vec![];
        for key in &keys {
            let values: Vec<Estimate> = scores.iter().map(|s| s[ti].aggregate(key)).collect();
            let differences = scores[1..]
                .iter()
                .map(|s| paired_difference(&scores[0][ti].per_doc[key], &s[ti].per_doc[key]))
                .collect();
            rows.push(MetricRow { key: key.clone(), values, differences });
        }
        let mut disagreements = vec![];
        if let Some(first) = task_first_key(p.task, &keys) {
            for (si, s) in scores.iter().enumerate().skip(1) {
                let (a, b) = (&scores[0][ti].per_doc[&first], &s[ti].per_doc[&first]);
                for i in (0..p.len()).filter(|&i| a[i] != b[i]).take(EXAMPLES) {
                    disagreements.push(json!({
                        "doc_id": i, "subject": done[si].name, "metric": first,
                        "context": tail(&p.contexts[i], 400),
                        "first": scores[0][ti].logs[i], "other": s[ti].logs[i],
                    }));
                }
            }
        }
        results.push(TaskResult {
            task: p.task.name.clone(),
            file: p.task.file.clone(),
            output_type: format!("{:?}", p.task.output),
            num_fewshot: p.task.num_fewshot,
            documents: p.len(),
            metrics: rows,
            disagreements,
        });
    }
    let summary = BenchSummary {
        command: "bench",
        model: o.model.clone(),
        subjects: done,
        tasks: results,
        max_length,
        chat_template: chat.is_some(),
        seconds: started.elapsed().as_secs_f64(),
        out: o.out.clone(),
    };
    if let Some(out) = &o.out {
        write_out(out, &summary, &prepared, &scores)?;
    }
    for s in summary.subjects.iter().filter(|s| s.adapter.as_deref().is_some_and(Path::is_dir)) {
        let path = s.adapter.as_ref().unwrap().join("bench.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        if path.with_file_name("metrics.jsonl").exists() {
            crate::report::html::write_beside(path.parent().unwrap());
        }
    }
    Ok(summary)
}

/// The metric disagreements are shown on: acc for choices, the first exact match otherwise.
fn task_first_key(_task: &Task, keys: &[String]) -> Option<String> {
    keys.iter().find(|k| k.starts_with("acc,")).or(keys.first()).cloned()
}

/// The last `n` characters of a text.
fn tail(s: &str, n: usize) -> String {
    let count = s.chars().count();
    if count <= n {
        return s.to_string();
    }
    format!("…{}", s.chars().skip(count - n).collect::<String>())
}

/// `DIR/results.json` and per-document logs `DIR/samples/TASK/SUBJECT.jsonl`.
fn write_out(out: &Path, summary: &BenchSummary, prepared: &[Prepared], scores: &[Vec<Scores>]) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    std::fs::write(out.join("results.json"), serde_json::to_vec_pretty(summary)?)?;
    for (ti, p) in prepared.iter().enumerate() {
        let dir = out.join("samples").join(&p.task.name);
        std::fs::create_dir_all(&dir)?;
        for (si, s) in summary.subjects.iter().enumerate() {
            let mut text = String::new();
            for (i, log) in scores[si][ti].logs.iter().enumerate() {
                let mut log = log.clone();
                log["context"] = Value::String(p.contexts[i].clone());
                text.push_str(&serde_json::to_string(&log)?);
                text.push('\n');
            }
            let file = dir.join(format!("{}.jsonl", s.name.replace(['/', '#'], "_")));
            std::fs::write(&file, text).with_context(|| format!("cannot write {}", file.display()))?;
        }
    }
    Ok(())
}

impl Summary for BenchSummary {
    fn print_human(&self) {
        let names: Vec<&str> = self.subjects.iter().map(|s| s.name.as_str()).collect();
        let mut header = format!("{:<24} {:<26} {:>6}", "task", "metric", "n");
        for n in &names {
            header.push_str(&format!("  {:>17}", trim(n, 17)));
        }
        for n in names.iter().skip(1) {
            header.push_str(&format!("  {:>18}", trim(&format!("{n} - {}", names[0]), 18)));
        }
        println!("{header}");
        for t in &self.tasks {
            for m in &t.metrics {
                let mut line = format!("{:<24} {:<26} {:>6}", trim(&t.task, 24), trim(&m.key, 26), t.documents);
                for v in &m.values {
                    line.push_str(&format!("  {:>17}", show(v, false)));
                }
                for d in &m.differences {
                    line.push_str(&format!("  {:>18}", show(d, true)));
                }
                println!("{line}");
            }
        }
        let secs: Vec<String> = self.subjects.iter().map(|s| format!("{} {:.1} s", s.name, s.seconds)).collect();
        eprintln!("scored in {:.1} s ({})", self.seconds, secs.join(", "));
        if let Some(o) = &self.out {
            eprintln!("results and per-document logs in {}", o.display());
        }
    }
}

fn show(e: &Estimate, signed: bool) -> String {
    let v = if signed { format!("{:+.4}", e.value) } else { format!("{:.4}", e.value) };
    if e.stderr.is_finite() {
        format!("{v} ± {:.4}", e.stderr)
    } else {
        v
    }
}

fn trim(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).collect::<String>() + "…"
    }
}
