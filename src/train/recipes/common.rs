//! The loop every training method shares, and its pieces. A method is a [`Recipe`]: it owns its data
//! and its position in it, and each optimizer step it hands back the accumulated adapter gradients
//! and its metrics. [`drive`] does the rest, the same way for every method: resume from a
//! checkpoint, clip, the learning-rate schedule, AdamW, metrics.jsonl, held-out evaluation and
//! checkpoints on their cadence, the final adapter and loss plot, and the summary.

use crate::report::tensorboard::EventWriter;
use crate::train::device::{describe, gpu_used_mb, peak_rss_mb};
use crate::train::io::{checkpoint, load_model, peft, release_freed_memory, Placement};
use crate::train::model::Model;
use crate::train::optim::{clip_grad_norm, lr_at, AdamW};
use crate::train::options::TrainOptions;
use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// Held-out metrics by name; `loss` is always one of them.
pub type Metrics = BTreeMap<String, f64>;

/// (step, value) points of a curve.
type Curve = Vec<(f64, f64)>;

/// The model ready to train: base loaded (quantised for QLoRA), adapters added, the variables in
/// a fixed order with their PEFT names.
pub struct Trainable {
    pub model: Model,
    pub vars_named: Vec<(String, Var)>,
    pub vars: Vec<Var>,
    pub base_params: usize,
    pub base_bytes_per_param: f64,
    pub projection_bytes_per_param: f64,
}

impl Trainable {
    /// Adds a variable trained beside the adapters (a reward model's head).
    pub fn add_var(&mut self, name: &str, var: Var) {
        self.vars_named.push((name.to_string(), var.clone()));
        self.vars.push(var);
    }

    pub fn trainable_params(&self) -> usize {
        self.vars.iter().map(|v| v.elem_count()).sum()
    }
}

/// Where and how `opts` holds the base.
pub fn placement(opts: &TrainOptions) -> Placement {
    Placement {
        device: opts.device.clone(),
        dtype: opts.dtype.clone(),
        qlora: opts.qlora.clone(),
        qlora_embeddings: opts.qlora_embeddings,
    }
}

/// The model ready to train on the device and dtype of `opts`, checked against the data's manifest.
pub fn load_trainable(opts: &TrainOptions) -> Result<Trainable> {
    let mut model = load_model(&opts.model, None, &placement(opts))?;
    crate::train::data::check_manifest(&opts.data, model.config.vocab_size)?;
    let base_bytes_per_param = model.base_bytes_per_param();
    let projection_bytes_per_param = model.projection_bytes_per_param();
    model.add_lora(&opts.lora, opts.seed)?;
    let vars_named = model.lora_vars();
    if vars_named.is_empty() {
        bail!("no LoRA module matched --target {:?}", opts.lora.targets);
    }
    let vars: Vec<Var> = vars_named.iter().map(|(_, v)| v.clone()).collect();
    let base_params = model.config.num_params();
    Ok(Trainable { model, vars_named, vars, base_params, base_bytes_per_param, projection_bytes_per_param })
}

/// The gradient of every variable in `vars` order from a backward pass.
pub fn grads_of(vars: &[(String, Var)], store: &GradStore) -> Result<Vec<Tensor>> {
    vars.iter()
        .map(|(n, v)| {
            store
                .get(v.as_tensor())
                .cloned()
                .with_context(|| format!("no gradient reached {n}; the graph is cut somewhere"))
        })
        .collect()
}

/// Gradients summed over the micro-batches (or pairs) of one step, in the variables' order.
#[derive(Default)]
pub struct GradSum(Option<Vec<Tensor>>);

impl GradSum {
    pub fn add(&mut self, g: Vec<Tensor>) -> Result<()> {
        self.0 = Some(match self.0.take() {
            None => g,
            Some(a) => a.iter().zip(g).map(|(x, y)| x + y).collect::<candle_core::Result<_>>()?,
        });
        Ok(())
    }

    pub fn take(self) -> Option<Vec<Tensor>> {
        self.0
    }

    /// The step's gradients. A rank of a data-parallel run whose share of the step was empty adds
    /// zeros (the other ranks' sum is the step); in one process an empty step is the error `empty`.
    pub fn finish(self, t: &Trainable, empty: &str) -> Result<Vec<Tensor>> {
        match self.0 {
            Some(g) => Ok(g),
            None if crate::cluster::world().size > 1 => {
                Ok(t.vars.iter().map(|v| v.zeros_like()).collect::<candle_core::Result<_>>()?)
            }
            None => bail!("{empty}"),
        }
    }
}

/// One optimizer step's work, as a recipe hands it to the loop.
pub struct Step {
    /// The step's loss (what the gradients are of).
    pub loss: f64,
    /// The accumulated gradients, in the variables' order.
    pub grads: Vec<Tensor>,
    pub tokens: usize,
    /// Rows or pairs seen.
    pub examples: usize,
    /// The method's own metrics for metrics.jsonl.
    pub metrics: Map<String, Value>,
}

/// A training method's part of the loop.
pub trait Recipe {
    /// What one example is ("rows", "pairs"): names the rate in metrics.jsonl and the summary.
    const EXAMPLES: &'static str;
    /// What the data holds ("rows", "pairs", "prompts"), counted by `examples`.
    const DATA: &'static str = Self::EXAMPLES;
    /// The method's name (progress bar, summary).
    fn name(&self) -> &'static str;
    /// Training and held-out examples.
    fn examples(&self) -> (usize, usize);
    fn steps_per_epoch(&self) -> u64;
    /// `--probe-memory`: runs the step's most memory-hungry work once before training, leaving the
    /// run unchanged; says what it ran, or None when the method has no probe.
    fn probe(&mut self, _t: &Trainable) -> Result<Option<String>> {
        Ok(None)
    }
    /// The accumulated gradients of optimizer step `step` (0-based).
    fn step(&mut self, t: &Trainable, step: u64) -> Result<Step>;
    /// Held-out metrics, or None without held-out data.
    fn evaluate(&mut self, model: &Model) -> Result<Option<Metrics>>;
    /// The held-out metric that tracks progress (the eval curve, the summary's first and final).
    fn eval_key(&self) -> &'static str {
        "loss"
    }
    /// What a checkpoint must keep to continue bit for bit, beyond the step and the optimizer.
    fn state(&self) -> Map<String, Value> {
        Map::new()
    }
    fn restore(&mut self, _state: &Value) -> Result<()> {
        Ok(())
    }
    /// Adds to an adapter directory what the method trains beside the adapters (a reward head).
    fn save_extra(&self, _model: &Model, _dir: &Path) -> Result<()> {
        Ok(())
    }
}

/// The `--probe-memory` run: the micro-batch and the peak memory after it.
#[derive(Debug, Serialize)]
pub struct Probe {
    pub micro_batch: String,
    pub peak_memory_mb: f64,
    pub peak_gpu_memory_mb: Option<f64>,
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
    /// What `--probe-memory` ran before step 1, and the peak memory then.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe: Option<Probe>,
    /// Where it computed: "cpu (f32)", "cuda (bf16)".
    pub device: String,
    /// Peak GPU memory in use (all processes, sampled every step); None on the CPU.
    pub peak_gpu_memory_mb: Option<f64>,
}

/// metrics.jsonl, one record per line, appended to on resume; with `--report-to tensorboard` each record's numbers also
/// as TensorBoard scalars at its step (`eval_loss` as `eval/loss`, the others as `train/NAME`).
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

/// A metrics record with each held-out metric as `eval_<name>`.
fn add_eval(rec: &mut Value, m: &Metrics) {
    for (k, v) in m {
        rec[format!("eval_{k}")] = json!(v);
    }
}

/// Sums a step over the ranks of a data-parallel run: the gradients (each rank's already scaled by
/// the whole step's normaliser, so the sum is the step's gradient), the loss, tokens and examples.
/// Every rank then holds the same step and runs clipping and AdamW identically. Returns the seconds
/// of the gradient sum alone (the counts' sum before it waits for the slowest rank).
fn sum_over_ranks(world: &crate::cluster::World, s: &mut Step, vars: &[Var]) -> Result<f64> {
    let mut counts = [s.loss, s.tokens as f64, s.examples as f64];
    world.sum_f64(&mut counts)?;
    (s.loss, s.tokens, s.examples) = (counts[0], counts[1] as usize, counts[2] as usize);
    if !s.loss.is_finite() {
        return Ok(0.0); // every rank stops on the same sum
    }
    let flat: Vec<Tensor> = s
        .grads
        .iter()
        .map(|g| g.flatten_all()?.to_dtype(candle_core::DType::F32))
        .collect::<candle_core::Result<_>>()?;
    let (sum, seconds) = world.sum_tensor(&Tensor::cat(&flat, 0)?)?;
    let mut at = 0;
    for (g, v) in s.grads.iter_mut().zip(vars) {
        let n = v.elem_count();
        *g = sum.narrow(0, at, n)?.reshape(v.dims())?.to_dtype(v.dtype())?;
        at += n;
    }
    Ok(seconds)
}

/// A digest of what every rank of a data-parallel run must share: the options and the data's manifest.
fn run_digest(opts: &TrainOptions) -> Result<u64> {
    let mut bytes = serde_json::to_vec(opts)?;
    bytes.extend(std::fs::read(opts.data.join(crate::pack::manifest::FILE)).unwrap_or_default());
    Ok(xxhash_rust::xxh3::xxh3_64(&bytes))
}

/// Runs `recipe` to the end of its steps with the options' optimizer, schedule and cadences. In a
/// data-parallel run every rank drives its share of each step; rank 0 alone writes metrics,
/// checkpoints, the adapter and the report.
pub fn drive<R: Recipe>(
    opts: &TrainOptions,
    t: Trainable,
    mut recipe: R,
    resume: Option<&Path>,
) -> Result<TrainSummary> {
    let start = Instant::now();
    // TUNEKIT_PROFILE=1: per-step optimizer seconds in metrics.jsonl (the recipes add theirs; adds syncs).
    let profile = std::env::var_os("TUNEKIT_PROFILE").is_some();
    let device = t.model.device.clone();
    let world = crate::cluster::world();
    if world.size > 1 {
        world.check_same(run_digest(opts)?, "options or data")?;
    }
    let main = world.is_main();
    let mut peak_gpu = gpu_used_mb(&device);
    let mut optim = AdamW::new(opts.optim.clone(), &t.vars)?;
    let mut step = 0u64;
    if let Some(dir) = resume {
        let state = checkpoint::read(dir, &t.vars_named, &mut optim)?;
        step = state["step"].as_u64().with_context(|| format!("{}: state.json has no step", dir.display()))?;
        let saved = state["world_size"].as_u64().unwrap_or(1) as usize;
        if saved != world.size {
            bail!(
                "{} was saved by a run of {saved} rank(s); this run has {}: resume with the same world size                  (each step's micro-batches are split over the ranks)",
                dir.display(),
                world.size
            );
        }
        recipe.restore(&state)?;
    }
    let total = opts.max_steps.unwrap_or(recipe.steps_per_epoch() * opts.epochs.max(1));
    std::fs::create_dir_all(&opts.out).with_context(|| format!("cannot create {}", opts.out.display()))?;
    let metrics_path = opts.out.join("metrics.jsonl");
    let tb_dir = opts.out.join("tensorboard");
    let mut metrics = match main {
        true => Some(MetricsLog::open(
            &metrics_path,
            resume.is_some(),
            opts.tensorboard.then_some((tb_dir.as_path(), opts)),
        )?),
        false => None,
    };
    let pb = crate::progress::bar(recipe.name(), total);
    pb.set_position(step);
    let (mut first_loss, mut last_loss) = (None, None);
    let (mut first_eval, mut last_eval): (Option<Metrics>, Option<Metrics>) = (None, None);
    let (mut curve, mut eval_curve): (Curve, Curve) = (vec![], vec![]);
    let (mut tokens_total, mut examples_total, mut step_seconds) = (0u64, 0usize, 0f64);
    // Every rank takes part in a checkpoint's state (a recipe may gather each rank's part); rank 0 writes it.
    let save_checkpoint = |dir: &Path, recipe: &R, optim: &AdamW, step: u64| -> Result<()> {
        let mut state = recipe.state();
        state.insert("step".into(), json!(step));
        if world.size > 1 {
            state.insert("world_size".into(), json!(world.size));
        }
        if !main {
            return Ok(());
        }
        checkpoint::write(dir, &t.model, opts, optim, Value::Object(state), &|d| recipe.save_extra(&t.model, d))
    };
    let write_metrics = |metrics: &mut Option<MetricsLog>, rec: &Value| match metrics {
        Some(m) => m.write(rec),
        None => Ok(()),
    };
    let mut probe = None;
    if opts.probe_memory {
        match recipe.probe(&t)? {
            Some(what) => {
                release_freed_memory();
                let p = Probe {
                    micro_batch: what,
                    peak_memory_mb: peak_rss_mb(),
                    peak_gpu_memory_mb: gpu_used_mb(&device),
                };
                crate::progress::note(&format!(
                    "--probe-memory: the largest micro-batch ({}) fits: peak memory {:.0} MB{}",
                    p.micro_batch,
                    p.peak_memory_mb,
                    p.peak_gpu_memory_mb.map(|g| format!(", GPU {g:.0} MB")).unwrap_or_default()
                ));
                probe = Some(p);
            }
            None => {
                crate::progress::warn(&format!("--probe-memory: {} has no probe yet; training as usual", recipe.name()))
            }
        }
    }
    let train_start = Instant::now();
    // Held-out evaluation runs on rank 0 (every rank holds the same adapter).
    if resume.is_none() && opts.eval_every > 0 && main {
        if let Some(m) = recipe.evaluate(&t.model)? {
            let mut rec = json!({"step": 0});
            add_eval(&mut rec, &m);
            write_metrics(&mut metrics, &rec)?;
            eval_curve.push((0.0, m.get(recipe.eval_key()).copied().unwrap_or(f64::NAN)));
            first_eval = Some(m);
        }
    }
    while step < total {
        let t0 = Instant::now();
        let mut s = recipe.step(&t, step)?;
        let t_reduce = if world.distributed() { sum_over_ranks(world, &mut s, &t.vars)? } else { 0.0 };
        if !s.loss.is_finite() {
            bail!(
                "step {}: the loss is {}; stopping. The last good checkpoint is kept in {}",
                step + 1,
                s.loss,
                opts.out.display()
            );
        }
        let t_opt = Instant::now();
        let mut grads = s.grads;
        let grad_norm = clip_grad_norm(&mut grads, opts.max_grad_norm)?;
        let lr = lr_at(opts.optim.lr, step, opts.warmup_steps, total, opts.schedule);
        optim.update(&t.vars, &grads, lr)?;
        drop(grads);
        release_freed_memory();
        if profile {
            device.synchronize()?;
        }
        let t_opt = t_opt.elapsed().as_secs_f64();
        step += 1;
        let dt = t0.elapsed().as_secs_f64();
        tokens_total += s.tokens as u64;
        examples_total += s.examples;
        step_seconds += dt;
        first_loss.get_or_insert(s.loss);
        last_loss = Some(s.loss);
        curve.push((step as f64, s.loss));
        let mut rec = json!({"step": step, "loss": s.loss, "lr": lr, "grad_norm": grad_norm, "tokens": s.tokens, "step_time": dt});
        for (k, v) in s.metrics {
            rec[k] = v;
        }
        rec["tokens_per_s"] = json!(s.tokens as f64 / dt);
        rec[format!("{}_per_s", R::EXAMPLES)] = json!(s.examples as f64 / dt);
        rec["peak_memory_mb"] = json!(peak_rss_mb());
        if profile {
            rec["seconds_optimizer"] = json!(t_opt);
        }
        if world.distributed() {
            rec["seconds_all_reduce"] = json!(t_reduce);
            rec["bytes_all_reduced"] = json!(4 * t.trainable_params());
        }
        if let Some(used) = gpu_used_mb(&device) {
            peak_gpu = Some(peak_gpu.map_or(used, |p: f64| p.max(used)));
            rec["gpu_memory_mb"] = json!(used);
        }
        if main && opts.eval_every > 0 && (step.is_multiple_of(opts.eval_every) || step == total) {
            if let Some(m) = recipe.evaluate(&t.model)? {
                add_eval(&mut rec, &m);
                eval_curve.push((step as f64, m.get(recipe.eval_key()).copied().unwrap_or(f64::NAN)));
                first_eval.get_or_insert_with(|| m.clone());
                last_eval = Some(m);
            }
        }
        write_metrics(&mut metrics, &rec)?;
        pb.set_message(format!("loss {:.4} lr {lr:.2e} {:.0} tok/s", s.loss, s.tokens as f64 / dt));
        pb.set_position(step);
        if opts.save_every > 0 && step.is_multiple_of(opts.save_every) && step < total {
            save_checkpoint(&opts.out.join(format!("checkpoint-{step}")), &recipe, &optim, step)?;
        }
    }
    pb.finish_and_clear();
    if main {
        peft::save(&t.model, &opts.lora, &opts.model.display().to_string(), &opts.out)?;
        recipe.save_extra(&t.model, &opts.out)?;
    }
    save_checkpoint(&opts.out.join("checkpoint-last"), &recipe, &optim, step)?;
    let plot = if curve.is_empty() || !main {
        None
    } else {
        let p = opts.out.join("loss.png");
        let series =
            crate::report::charts::loss_series(|w| w.to_string(), &curve, Some((recipe.eval_key(), &eval_curve)));
        crate::report::charts::line_chart_png(&p, "Loss", "step", "loss (nats per trained token)", &series)?;
        Some(p.display().to_string())
    };
    let report = main.then(|| crate::report::html::write_beside(&opts.out)).flatten().map(|p| p.display().to_string());
    let secs = train_start.elapsed().as_secs_f64();
    let trainable = t.trainable_params();
    let total_params = t.base_params + trainable;
    let (examples, eval_examples) = recipe.examples();
    Ok(TrainSummary {
        command: "train",
        method: opts.method.name(),
        out: opts.out.display().to_string(),
        steps: step,
        examples,
        eval_examples,
        data_unit: R::DATA,
        unit: R::EXAMPLES,
        trainable_params: trainable,
        total_params,
        trainable_percent: 100.0 * trainable as f64 / total_params as f64,
        first_loss,
        final_loss: last_loss,
        first_eval_loss: first_eval.as_ref().and_then(|m| m.get("loss").copied()),
        final_eval_loss: last_eval.as_ref().and_then(|m| m.get("loss").copied()),
        first_eval,
        final_eval: last_eval,
        tokens: tokens_total,
        tokens_per_s: tokens_total as f64 / secs.max(1e-9),
        examples_per_s: examples_total as f64 / step_seconds.max(1e-9),
        seconds: start.elapsed().as_secs_f64(),
        metrics: metrics_path.display().to_string(),
        plot,
        report,
        base_bytes_per_param: t.base_bytes_per_param,
        projection_bytes_per_param: t.projection_bytes_per_param,
        peak_memory_mb: peak_rss_mb(),
        probe,
        device: describe(&device, t.model.dtype),
        peak_gpu_memory_mb: peak_gpu,
    })
}
