//! What a run records as it goes: metrics.jsonl (appended to on resume) and, with `--report-to
//! tensorboard`, the same numbers as TensorBoard scalars, written by rank 0; the loss and held-out
//! curves and the totals the summary reports.

use super::recipe::{Metrics, Step};
use crate::report::tensorboard::EventWriter;
use crate::train::device::{gpu_used_mb, peak_rss_mb};
use crate::train::options::TrainOptions;
use anyhow::{Context, Result};
use candle_core::Device;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

/// (step, value) points of a curve.
pub type Curve = Vec<(f64, f64)>;

/// metrics.jsonl, one record per line, appended to on resume; with `--report-to tensorboard` each
/// record's numbers also as TensorBoard scalars at its step (`eval_loss` as `eval/loss`, the others
/// as `train/NAME`).
struct MetricsLog(std::fs::File, Option<EventWriter>);

impl MetricsLog {
    fn open(path: &Path, append: bool, tensorboard: Option<(&Path, &TrainOptions)>) -> Result<Self> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let tb = match tensorboard {
            Some((dir, opts)) => {
                let mut w = EventWriter::create(dir)?;
                let options = serde_json::to_string_pretty(opts)?;
                w.text(0, "options", &format!("```\n{options}\n```"))?;
                Some(w)
            }
            None => None,
        };
        Ok(MetricsLog(f, tb))
    }

    fn write(&mut self, rec: &Value) -> Result<()> {
        writeln!(self.0, "{rec}")?;
        if let (Some(tb), Some(step)) = (self.1.as_mut(), rec["step"].as_u64()) {
            let scalars: Vec<(String, f64)> = rec
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| k.as_str() != "step")
                .filter_map(|(k, v)| {
                    let tag = match k.strip_prefix("eval_") {
                        Some(e) => format!("eval/{e}"),
                        None => format!("train/{k}"),
                    };
                    v.as_f64().map(|x| (tag, x))
                })
                .collect();
            tb.scalars(step, &scalars)?;
        }
        Ok(())
    }
}

/// What the optimizer did in one step.
pub struct Update {
    pub lr: f64,
    pub grad_norm: f64,
    /// Seconds of clipping and AdamW (measured with `TUNEKIT_PROFILE=1`).
    pub seconds: Option<f64>,
}

/// The run's record so far.
pub struct RunLog {
    /// metrics.jsonl (None on the ranks other than 0).
    file: Option<MetricsLog>,
    pub path: PathBuf,
    device: Device,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub first_eval: Option<Metrics>,
    pub last_eval: Option<Metrics>,
    pub curve: Curve,
    pub eval_curve: Curve,
    pub tokens: u64,
    pub examples: usize,
    /// Seconds of the steps themselves (not the evaluations and checkpoints between them).
    pub step_seconds: f64,
    /// Peak GPU memory in use, sampled every step; None on the CPU.
    pub peak_gpu_mb: Option<f64>,
}

impl RunLog {
    /// Opens metrics.jsonl in `--out` (and the TensorBoard events beside it) on rank 0.
    pub fn open(opts: &TrainOptions, resumed: bool, device: &Device) -> Result<Self> {
        let path = opts.out.join("metrics.jsonl");
        let tb_dir = opts.out.join("tensorboard");
        let file = match crate::cluster::world().is_main() {
            true => Some(MetricsLog::open(&path, resumed, opts.tensorboard.then_some((tb_dir.as_path(), opts)))?),
            false => None,
        };
        Ok(RunLog {
            file,
            path,
            device: device.clone(),
            first_loss: None,
            last_loss: None,
            first_eval: None,
            last_eval: None,
            curve: vec![],
            eval_curve: vec![],
            tokens: 0,
            examples: 0,
            step_seconds: 0.0,
            peak_gpu_mb: gpu_used_mb(device),
        })
    }

    /// Counts optimizer step `step` (1-based) and returns its metrics record: the loss, the
    /// optimizer's numbers, the recipe's metrics, rates (`examples` names the unit), memory.
    pub fn step(
        &mut self,
        step: u64,
        s: Step,
        update: &Update,
        seconds: f64,
        examples: &str,
        all_reduce: Option<(f64, usize)>,
    ) -> Value {
        self.tokens += s.tokens as u64;
        self.examples += s.examples;
        self.step_seconds += seconds;
        self.first_loss.get_or_insert(s.loss);
        self.last_loss = Some(s.loss);
        self.curve.push((step as f64, s.loss));
        let mut rec = json!({"step": step, "loss": s.loss, "lr": update.lr, "grad_norm": update.grad_norm, "tokens": s.tokens, "step_time": seconds});
        for (k, v) in s.metrics {
            rec[k] = v;
        }
        rec["tokens_per_s"] = json!(s.tokens as f64 / seconds);
        rec[format!("{examples}_per_s")] = json!(s.examples as f64 / seconds);
        rec["peak_memory_mb"] = json!(peak_rss_mb());
        if let Some(t) = update.seconds {
            rec["seconds_optimizer"] = json!(t);
        }
        if let Some((t, params)) = all_reduce {
            rec["seconds_all_reduce"] = json!(t);
            rec["bytes_all_reduced"] = json!(4 * params);
        }
        if let Some(used) = gpu_used_mb(&self.device) {
            self.peak_gpu_mb = Some(self.peak_gpu_mb.map_or(used, |p: f64| p.max(used)));
            rec["gpu_memory_mb"] = json!(used);
        }
        rec
    }

    /// Adds held-out metrics `m` at `step` to the record `rec` (each as `eval_<name>`) and to the
    /// curve of `key`; the first ones are the run's first, those after a step its last.
    pub fn eval(&mut self, step: u64, m: Metrics, key: &str, rec: &mut Value) {
        for (k, v) in &m {
            rec[format!("eval_{k}")] = json!(v);
        }
        self.eval_curve.push((step as f64, m.get(key).copied().unwrap_or(f64::NAN)));
        self.first_eval.get_or_insert_with(|| m.clone());
        if step > 0 {
            self.last_eval = Some(m);
        }
    }

    /// Appends `rec` to metrics.jsonl (rank 0).
    pub fn write(&mut self, rec: &Value) -> Result<()> {
        match &mut self.file {
            Some(f) => f.write(rec),
            None => Ok(()),
        }
    }
}
