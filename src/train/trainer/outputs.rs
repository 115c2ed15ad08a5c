//! The run's ends: `--probe-memory` before the first step, and after the last the adapter in
//! PEFT's format (a full fine-tune's Hugging Face model directory), `checkpoint-last/`, the loss chart, the HTML report and the [`TrainSummary`].

use super::checkpoints;
use super::log::RunLog;
use super::recipe::{Metrics, Recipe};
use super::trainable::Trainable;
use crate::allocator::release_freed_memory;
use crate::train::device::{describe, gpu_used_mb, peak_rss_mb};
use crate::train::optim::AdamW;
use crate::train::options::TrainOptions;
use anyhow::Result;
use serde::Serialize;
use std::time::Instant;

/// The `--probe-memory` run: the micro-batch and the peak memory after it.
#[derive(Debug, Serialize)]
pub struct Probe {
    pub micro_batch: String,
    pub peak_memory_mb: f64,
    pub peak_gpu_memory_mb: Option<f64>,
}

/// Where the peak memory went: the frozen weights and the adapters (with their gradients and
/// AdamW's moments; in full fine-tuning every weight's) as held, the step's activations and loss
/// head as estimated for the largest micro-batch, and the rest (the runtime: tokenizer, shards,
/// buffers, the allocator's slack).
#[derive(Debug, Serialize)]
pub struct MemoryBreakdown {
    pub peak_mb: f64,
    /// The peak while the model and data loaded (before the first step).
    pub loading_peak_mb: f64,
    pub weights_mb: f64,
    pub trained_mb: f64,
    pub activations_mb: Option<f64>,
    pub loss_head_mb: Option<f64>,
    pub rest_mb: f64,
}

impl MemoryBreakdown {
    fn of<R: Recipe>(t: &Trainable, recipe: &R, loading_peak_mb: f64) -> MemoryBreakdown {
        const MB: f64 = 1024.0 * 1024.0;
        let peak_mb = peak_rss_mb();
        let weights_mb = if t.model.is_full() { 0.0 } else { t.model.frozen_matrices_held().1 as f64 / MB };
        // The variables, their gradients and two moments, in f32.
        let trained_mb = t.trainable_params() as f64 * 16.0 / MB;
        let e = recipe.memory_estimate(&t.model.config);
        let (activations_mb, loss_head_mb) = (e.as_ref().map(|e| e.activations_mb), e.as_ref().map(|e| e.loss_head_mb));
        let known = weights_mb + trained_mb + activations_mb.unwrap_or(0.0) + loss_head_mb.unwrap_or(0.0);
        let rest_mb = peak_mb - known;
        MemoryBreakdown { peak_mb, loading_peak_mb, weights_mb, trained_mb, activations_mb, loss_head_mb, rest_mb }
    }

    /// One line for the summary.
    pub fn describe(&self) -> String {
        let (step, rest) = match (self.activations_mb, self.loss_head_mb) {
            (Some(a), Some(h)) => (
                format!(", activations ~{a:.0} and loss head ~{h:.0} (estimated, largest micro-batch)"),
                "runtime and allocator",
            ),
            // Methods without an estimate (generation, pairs): the step is in the rest.
            _ => (String::new(), "the steps' activations, runtime and allocator"),
        };
        let when = match self.loading_peak_mb >= self.peak_mb - 1.0 {
            true => "reached while loading",
            false => "in the steps",
        };
        format!(
            "peak {:.0} MB ({when}; {:.0} MB while loading) = frozen weights {:.0}, trained weights with gradients \
             and moments {:.0}{step}, {rest} {:.0} (the rest)",
            self.peak_mb, self.loading_peak_mb, self.weights_mb, self.trained_mb, self.rest_mb
        )
    }
}

/// What a training run reports, whatever its method.
#[derive(Debug, Serialize)]
pub struct TrainSummary {
    pub command: &'static str,
    pub method: &'static str,
    pub out: String,
    pub steps: u64,
    /// Training and held-out examples of the data (rows, pairs or prompts, as `data_unit` says).
    pub examples: usize,
    pub eval_examples: usize,
    pub data_unit: &'static str,
    /// What `examples_per_s` counts (rows, pairs, completions).
    pub unit: &'static str,
    /// Every weight trained (`--full`): `out` is a Hugging Face model directory, not an adapter.
    pub full: bool,
    pub trainable_params: usize,
    pub total_params: usize,
    pub trainable_percent: f64,
    pub first_loss: Option<f64>,
    pub final_loss: Option<f64>,
    pub first_eval_loss: Option<f64>,
    pub final_eval_loss: Option<f64>,
    /// Every held-out metric before the first step and after the last.
    pub first_eval: Option<Metrics>,
    pub final_eval: Option<Metrics>,
    pub tokens: u64,
    pub tokens_per_s: f64,
    pub examples_per_s: f64,
    pub seconds: f64,
    pub metrics: String,
    pub plot: Option<String>,
    /// report.html beside the adapter (charts of every metric, the options).
    pub report: Option<String>,
    /// Bytes per parameter of all frozen weight matrices (projections, embedding, lm_head).
    pub base_bytes_per_param: f64,
    /// Bytes per parameter of the seven projections alone (4 for f32, 2 for bf16, ~0.52 for NF4).
    pub projection_bytes_per_param: f64,
    /// Peak resident memory of the process.
    pub peak_memory_mb: f64,
    /// Where it went.
    pub memory: MemoryBreakdown,
    /// What `--probe-memory` ran before step 1, and the peak memory then.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe: Option<Probe>,
    /// Where it computed: "cpu (f32)", "cuda (bf16)".
    pub device: String,
    /// Peak GPU memory in use (all processes, sampled every step); None on the CPU.
    pub peak_gpu_memory_mb: Option<f64>,
}

/// `--probe-memory`: the recipe's most memory-hungry work once before training (the run is
/// unchanged), and the peak memory after it.
pub fn probe_memory<R: Recipe>(recipe: &mut R, t: &Trainable) -> Result<Option<Probe>> {
    let Some(what) = recipe.probe(t)? else {
        crate::progress::warn(&format!("--probe-memory: {} has no probe yet; training as usual", recipe.name()));
        return Ok(None);
    };
    release_freed_memory();
    let p =
        Probe { micro_batch: what, peak_memory_mb: peak_rss_mb(), peak_gpu_memory_mb: gpu_used_mb(&t.model.device) };
    crate::progress::note(&format!(
        "--probe-memory: the largest micro-batch ({}) fits: peak memory {:.0} MB{}",
        p.micro_batch,
        p.peak_memory_mb,
        p.peak_gpu_memory_mb.map(|g| format!(", GPU {g:.0} MB")).unwrap_or_default()
    ));
    Ok(Some(p))
}

/// Where and when the run started, for the summary.
pub struct Clock {
    /// The loop's start (resume and setup included).
    pub start: Instant,
    /// The first step's start (after the probe and the first evaluation).
    pub training: Instant,
    /// The peak memory when the loop began: loading the model and the data.
    pub loaded_peak_mb: f64,
}

/// Writes what a finished run leaves (rank 0: the adapter, the chart, the report; every rank takes
/// part in `checkpoint-last/`) and sums the run up.
#[allow(clippy::too_many_arguments)]
pub fn finish<R: Recipe>(
    opts: &TrainOptions,
    t: &Trainable,
    recipe: &R,
    optim: &AdamW,
    step: u64,
    log: RunLog,
    probe: Option<Probe>,
    clock: Clock,
) -> Result<TrainSummary> {
    let main = crate::cluster::world().is_main();
    if main {
        checkpoints::save_weights(opts, &t.model, &opts.out)?;
        recipe.save_extra(&t.model, &opts.out)?;
    }
    checkpoints::save(&opts.out.join("checkpoint-last"), opts, t, recipe, optim, step)?;
    let plot = if log.curve.is_empty() || !main {
        None
    } else {
        let p = opts.out.join("loss.png");
        let series = crate::report::charts::loss_series(
            |w| w.to_string(),
            &log.curve,
            Some((recipe.eval_key(), &log.eval_curve)),
        );
        crate::report::charts::line_chart_png(&p, "Loss", "step", "loss (nats per trained token)", &series)?;
        Some(p.display().to_string())
    };
    let report = main.then(|| crate::report::html::write_beside(&opts.out)).flatten().map(|p| p.display().to_string());
    let secs = clock.training.elapsed().as_secs_f64();
    let trainable = t.trainable_params();
    let total_params = t.base_params + trainable;
    let (examples, eval_examples) = recipe.examples();
    let memory = MemoryBreakdown::of(t, recipe, clock.loaded_peak_mb);
    Ok(TrainSummary {
        command: "train",
        method: opts.method.name(),
        out: opts.out.display().to_string(),
        steps: step,
        examples,
        eval_examples,
        data_unit: R::DATA,
        unit: R::EXAMPLES,
        full: t.model.is_full(),
        trainable_params: trainable,
        total_params,
        trainable_percent: 100.0 * trainable as f64 / total_params as f64,
        first_loss: log.first_loss,
        final_loss: log.last_loss,
        first_eval_loss: log.first_eval.as_ref().and_then(|m| m.get("loss").copied()),
        final_eval_loss: log.last_eval.as_ref().and_then(|m| m.get("loss").copied()),
        first_eval: log.first_eval,
        final_eval: log.last_eval,
        tokens: log.tokens,
        tokens_per_s: log.tokens as f64 / secs.max(1e-9),
        examples_per_s: log.examples as f64 / log.step_seconds.max(1e-9),
        seconds: clock.start.elapsed().as_secs_f64(),
        metrics: log.path.display().to_string(),
        plot,
        report,
        base_bytes_per_param: t.base_bytes_per_param,
        projection_bytes_per_param: t.projection_bytes_per_param,
        peak_memory_mb: memory.peak_mb,
        memory,
        probe,
        device: describe(&t.model.device, t.model.dtype),
        peak_gpu_memory_mb: log.peak_gpu_mb,
    })
}
