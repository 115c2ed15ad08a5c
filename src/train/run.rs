//! `tunekit train`: the training loop. Read shards, micro-batch by tokens, accumulate gradients
//! (the loss is normalised by the trained tokens of the whole accumulated batch), clip, AdamW,
//! warmup + decay; eval, checkpoints and bit-for-bit resume; metrics.jsonl and a loss curve.

use super::data::{check_manifest, Shards};
use super::lora::LoraSettings;
use super::model::{Batch, Model};
use super::optim::{clip_grad_norm, lr_at, AdamW, AdamWConfig, Schedule};
use super::weights::BaseModel;
use crate::split::SplitMix64;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainOptions {
    pub model: PathBuf,
    pub data: PathBuf,
    pub out: PathBuf,
    pub epochs: u64,
    pub max_steps: Option<u64>,
    pub optim: AdamWConfig,
    pub warmup_steps: u64,
    pub schedule: Schedule,
    pub batch_tokens: usize,
    pub grad_accum: usize,
    pub max_grad_norm: f64,
    pub lora: LoraSettings,
    pub eval_every: u64,
    pub save_every: u64,
    pub seed: u64,
    pub logits_chunk: usize,
    /// QLoRA: hold the frozen projections in 4 bits ("nf4"); None = full precision.
    #[serde(default)]
    pub qlora: Option<String>,
    /// QLoRA: also hold the token embedding and lm_head in NF4 (default: full precision).
    #[serde(default)]
    pub qlora_embeddings: bool,
    /// Keep only each layer's input in the forward and recompute layer by layer in the backward.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// auto, cpu, cuda or cuda:N (auto: a GPU when built with CUDA and one is present).
    #[serde(default = "auto")]
    pub device: String,
    /// Compute dtype: auto (bf16 on a GPU, f32 on the CPU), f32 or bf16.
    #[serde(default = "auto")]
    pub dtype: String,
}

fn auto() -> String {
    "auto".into()
}

#[derive(Debug, Serialize, Deserialize)]
struct TrainState {
    step: u64,
    micro_done: u64,
    dropout_rng: u64,
}

#[derive(Debug, Serialize)]
pub struct TrainSummary {
    pub command: &'static str,
    pub out: String,
    pub steps: u64,
    pub trainable_params: usize,
    pub total_params: usize,
    pub trainable_percent: f64,
    pub first_loss: Option<f64>,
    pub final_loss: Option<f64>,
    pub first_eval_loss: Option<f64>,
    pub final_eval_loss: Option<f64>,
    pub tokens: u64,
    pub tokens_per_s: f64,
    pub seconds: f64,
    pub metrics: String,
    pub plot: Option<String>,
    /// Bytes per parameter of all frozen weight matrices (projections, embedding, lm_head).
    pub base_bytes_per_param: f64,
    /// Bytes per parameter of the seven projections alone (4 for f32, 2 for bf16, ~0.52 for NF4).
    pub projection_bytes_per_param: f64,
    /// Peak resident memory of the process.
    pub peak_memory_mb: f64,
    /// Where it computed: "cpu (f32)", "cuda (bf16)".
    pub device: String,
    /// Peak GPU memory in use (all processes, sampled every step); None on the CPU.
    pub peak_gpu_memory_mb: Option<f64>,
}

/// Peak resident set size of this process (Linux), in MB.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn grads_of(vars: &[(String, Var)], store: &candle_core::backprop::GradStore) -> Result<Vec<Tensor>> {
    vars.iter()
        .map(|(n, v)| {
            store
                .get(v.as_tensor())
                .cloned()
                .with_context(|| format!("no gradient reached {n}; the graph is cut somewhere"))
        })
        .collect()
}

/// Mean token loss over a split (no gradients).
pub fn evaluate(model: &Model, shards: &Shards, budget: usize, chunk: usize) -> Result<(f64, u64)> {
    let order: Vec<usize> = (0..shards.rows.len()).collect();
    let (mut sum, mut n) = (0.0f64, 0u64);
    for mb in shards.micro_batches(&order, budget) {
        let rows: Vec<_> = mb.iter().map(|&i| &shards.rows[i]).collect();
        let b = Batch::from_rows(&rows, &model.device)?;
        if b.trained == 0 {
            continue;
        }
        sum += super::fused::no_grad(|| model.loss_sum(&b, None, chunk))?.to_scalar::<f32>()? as f64;
        n += b.trained as u64;
    }
    Ok((if n == 0 { f64::NAN } else { sum / n as f64 }, n))
}

/// Writes a checkpoint directory atomically: the adapter (PEFT format; `extra` may add to it), the
/// optimizer moments, and `state.json` with the caller's state, Adam's step and the options.
pub fn write_checkpoint(
    dir: &Path,
    model: &Model,
    opts: &TrainOptions,
    opt: &AdamW,
    state: serde_json::Value,
    extra: &dyn Fn(&Path) -> Result<()>,
) -> Result<()> {
    let tmp = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    super::peft::save(model, &opts.lora, &opts.model.display().to_string(), &tmp)?;
    extra(&tmp)?;
    let mut t: HashMap<String, Tensor> = HashMap::new();
    for (i, (m, v)) in opt.m.iter().zip(&opt.v).enumerate() {
        t.insert(format!("m.{i}"), m.clone());
        t.insert(format!("v.{i}"), v.clone());
    }
    candle_core::safetensors::save(&t, tmp.join("optimizer.safetensors"))?;
    std::fs::write(
        tmp.join("state.json"),
        serde_json::to_string_pretty(&json!({"state": state, "adam_step": opt.step, "options": opts}))?,
    )?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&tmp, dir)?;
    Ok(())
}

/// Restores the trainable variables (by PEFT name) and the optimizer from a checkpoint; returns the
/// caller's state.
pub fn read_checkpoint(dir: &Path, vars_named: &[(String, Var)], opt: &mut AdamW) -> Result<serde_json::Value> {
    let st: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join("state.json")).with_context(|| format!("{}: not a checkpoint", dir.display()))?,
    )?;
    let (_, tensors) = super::peft::read(dir)?;
    for (n, v) in vars_named {
        v.set(&tensors.get(n).with_context(|| format!("checkpoint lacks {n}"))?.to_device(v.device())?)?;
    }
    let ot = candle_core::safetensors::load(dir.join("optimizer.safetensors"), &Device::Cpu)?;
    for (i, (_, var)) in vars_named.iter().enumerate() {
        opt.m[i] = ot.get(&format!("m.{i}")).context("optimizer state incomplete")?.to_device(var.device())?;
        opt.v[i] = ot.get(&format!("v.{i}")).context("optimizer state incomplete")?.to_device(var.device())?;
    }
    opt.step = st["adam_step"].as_u64().unwrap_or(0);
    Ok(st["state"].clone())
}

fn save_checkpoint(dir: &Path, model: &Model, opts: &TrainOptions, opt: &AdamW, state: &TrainState) -> Result<()> {
    write_checkpoint(dir, model, opts, opt, serde_json::to_value(state)?, &|_| Ok(()))
}

pub fn run(opts: &TrainOptions) -> Result<TrainSummary> {
    run_with_resume(opts, None)
}

/// The model ready to train: base loaded (quantised for QLoRA), adapters added.
pub struct Trainable {
    pub model: Model,
    pub vars_named: Vec<(String, Var)>,
    pub vars: Vec<Var>,
    pub trainable: usize,
    pub total_params: usize,
    pub base_bytes_per_param: f64,
    pub projection_bytes_per_param: f64,
}

/// Hands the heap's freed pages back to the system (glibc keeps them otherwise: the load's
/// dequantised temporaries and a step's activations would stay in the process's resident memory).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap memory to the OS.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The model ready to train on the device and dtype of `opts`.
pub fn load_trainable(opts: &TrainOptions) -> Result<Trainable> {
    let (device, dtype) = super::device::select(&opts.device, &opts.dtype)?;
    // QLoRA quantises (or keeps quantised) each projection as it is read, on the CPU; the model
    // then moves to the device.
    let mut base = BaseModel::load_with(&opts.model, &Device::Cpu, opts.qlora.as_deref())?;
    if opts.qlora_embeddings {
        if opts.qlora.is_none() {
            bail!("--qlora-embeddings quantises the embedding along with a 4-bit base: add --qlora nf4 or gguf");
        }
        base.quantize_embeddings()?;
    }
    check_manifest(&opts.data, base.config.vocab_size)?;
    let mut model = Model::from_base_as(&base, &device, dtype)?;
    drop(base);
    release_freed_memory();
    let base_bytes_per_param = model.base_bytes_per_param();
    let projection_bytes_per_param = model.projection_bytes_per_param();
    model.add_lora(&opts.lora, opts.seed)?;
    let vars_named = model.lora_vars();
    if vars_named.is_empty() {
        bail!("no LoRA module matched --target {:?}", opts.lora.targets);
    }
    let vars: Vec<Var> = vars_named.iter().map(|(_, v)| v.clone()).collect();
    let trainable: usize = vars.iter().map(|v| v.elem_count()).sum();
    let total_params = model.config.num_params() + trainable;
    Ok(Trainable { model, vars_named, vars, trainable, total_params, base_bytes_per_param, projection_bytes_per_param })
}

pub fn run_with_resume(opts: &TrainOptions, resume: Option<&Path>) -> Result<TrainSummary> {
    let start = Instant::now();
    let Trainable {
        model,
        vars_named,
        vars,
        trainable,
        total_params,
        base_bytes_per_param,
        projection_bytes_per_param,
    } = load_trainable(opts)?;
    let device = model.device.clone();
    // TUNEKIT_PROFILE=1: per-step forward/backward/optimizer seconds in metrics.jsonl (adds syncs).
    let profile = std::env::var_os("TUNEKIT_PROFILE").is_some();
    let mut peak_gpu = super::device::gpu_used_mb(&device);
    let train = Shards::load(&opts.data, "train")?;
    if train.rows.is_empty() {
        bail!("{}: no training rows (train-*.parquet)", opts.data.display());
    }
    let eval = Shards::load(&opts.data, "eval")?;
    let mut optim = AdamW::new(opts.optim.clone(), &vars)?;
    let mut state = TrainState { step: 0, micro_done: 0, dropout_rng: SplitMix64::new(opts.seed ^ 0xD0).state() };
    if let Some(dir) = resume {
        state = serde_json::from_value(read_checkpoint(dir, &vars_named, &mut optim)?)?;
    }
    let per_epoch: Vec<Vec<usize>> = train.micro_batches(&train.epoch_order(opts.seed, 0), opts.batch_tokens);
    let micro_per_epoch = per_epoch.len() as u64;
    let steps_per_epoch = micro_per_epoch.div_ceil(opts.grad_accum as u64);
    let total_steps = opts.max_steps.unwrap_or(steps_per_epoch * opts.epochs.max(1));
    std::fs::create_dir_all(&opts.out)?;
    let metrics_path = opts.out.join("metrics.jsonl");
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(resume.is_some())
        .write(true)
        .truncate(resume.is_none())
        .open(&metrics_path)?;
    let pb = crate::progress::bar("train", total_steps);
    pb.set_position(state.step);
    let mut dropout_rng = SplitMix64::from_state(state.dropout_rng);
    let (mut first_loss, mut last_loss, mut first_eval, mut last_eval) = (None, None, None, None);
    let mut curve: Vec<(f64, f64)> = Vec::new();
    let mut eval_curve: Vec<(f64, f64)> = Vec::new();
    let mut tokens_total = 0u64;
    let train_start = Instant::now();
    if resume.is_none() && opts.eval_every > 0 && !eval.rows.is_empty() {
        let (l, _) = evaluate(&model, &eval, opts.batch_tokens, opts.logits_chunk)?;
        first_eval = Some(l);
        eval_curve.push((0.0, l));
        writeln!(metrics, "{}", json!({"step": 0, "eval_loss": l}))?;
    }
    // The current epoch's micro-batches, rebuilt only when the epoch changes.
    let mut epoch_batches: (u64, Vec<Vec<usize>>) = (0, per_epoch);
    while state.step < total_steps {
        let t0 = Instant::now();
        // The micro-batches of this step, continuing across epochs deterministically.
        let mut micro = Vec::with_capacity(opts.grad_accum);
        for k in 0..opts.grad_accum as u64 {
            let g = state.micro_done + k;
            let (epoch, idx) = (g / micro_per_epoch, g % micro_per_epoch);
            if epoch_batches.0 != epoch {
                epoch_batches = (epoch, train.micro_batches(&train.epoch_order(opts.seed, epoch), opts.batch_tokens));
            }
            let list = &epoch_batches.1;
            micro.push(list[idx as usize % list.len()].clone());
        }
        let batches: Vec<Batch> = micro
            .iter()
            .map(|mb| Batch::from_rows(&mb.iter().map(|&i| &train.rows[i]).collect::<Vec<_>>(), &device))
            .collect::<Result<_>>()?;
        let trained: usize = batches.iter().map(|b| b.trained).sum();
        let tokens: usize = batches.iter().map(|b| b.tokens).sum();
        let mut acc: Option<Vec<Tensor>> = None;
        let mut loss_sum = 0.0f64;
        let (mut t_fwd, mut t_bwd) = (0.0, 0.0);
        for b in &batches {
            if b.trained == 0 {
                continue;
            }
            // Forward time ends when the loss is read; the rest (with checkpointing: the recompute too) is backward.
            let tf = Instant::now();
            let mut forward_done = tf;
            let g = if opts.gradient_checkpointing {
                let scale = 1.0 / trained as f64;
                let (l, g) = model.loss_and_grads_checkpointed(b, Some(&mut dropout_rng), opts.logits_chunk, scale)?;
                loss_sum += l;
                g
            } else {
                let l = model.loss_sum(b, Some(&mut dropout_rng), opts.logits_chunk)?;
                loss_sum += l.to_scalar::<f32>()? as f64;
                forward_done = Instant::now();
                grads_of(&vars_named, &(l / trained as f64)?.backward()?)?
            };
            if profile {
                device.synchronize()?;
            }
            t_fwd += (forward_done - tf).as_secs_f64();
            t_bwd += forward_done.elapsed().as_secs_f64();
            acc = Some(match acc {
                None => g,
                Some(a) => a.iter().zip(g).map(|(x, y)| x + y).collect::<candle_core::Result<_>>()?,
            });
        }
        let loss = loss_sum / trained.max(1) as f64;
        if !loss.is_finite() {
            bail!(
                "step {}: the loss is {loss}; stopping. The last good checkpoint is kept in {}",
                state.step + 1,
                opts.out.display()
            );
        }
        let t_opt = Instant::now();
        let mut grads = acc.context("no trained token in this step's batches")?;
        let grad_norm = clip_grad_norm(&mut grads, opts.max_grad_norm)?;
        let lr = lr_at(opts.optim.lr, state.step, opts.warmup_steps, total_steps, opts.schedule);
        optim.update(&vars, &grads, lr)?;
        drop(grads);
        release_freed_memory();
        if profile {
            device.synchronize()?;
        }
        let t_opt = t_opt.elapsed().as_secs_f64();
        state.step += 1;
        state.micro_done += opts.grad_accum as u64;
        state.dropout_rng = dropout_rng.state();
        tokens_total += tokens as u64;
        let dt = t0.elapsed().as_secs_f64();
        first_loss.get_or_insert(loss);
        last_loss = Some(loss);
        curve.push((state.step as f64, loss));
        let mut rec = json!({"step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens, "trained_tokens": trained, "tokens_per_s": tokens as f64 / dt, "peak_memory_mb": peak_rss_mb()});
        if profile {
            rec["seconds_forward"] = json!(t_fwd);
            rec["seconds_backward"] = json!(t_bwd);
            rec["seconds_optimizer"] = json!(t_opt);
        }
        if let Some(used) = super::device::gpu_used_mb(&device) {
            let peak = peak_gpu.map_or(used, |p: f64| p.max(used));
            peak_gpu = Some(peak);
            rec["gpu_memory_mb"] = json!(used);
        }
        if opts.eval_every > 0
            && !eval.rows.is_empty()
            && (state.step.is_multiple_of(opts.eval_every) || state.step == total_steps)
        {
            let (l, _) = evaluate(&model, &eval, opts.batch_tokens, opts.logits_chunk)?;
            rec["eval_loss"] = json!(l);
            first_eval.get_or_insert(l);
            last_eval = Some(l);
            eval_curve.push((state.step as f64, l));
        }
        writeln!(metrics, "{rec}")?;
        pb.set_message(format!("loss {loss:.4} lr {lr:.2e} {:.0} tok/s", tokens as f64 / dt));
        pb.set_position(state.step);
        if opts.save_every > 0 && state.step.is_multiple_of(opts.save_every) && state.step < total_steps {
            save_checkpoint(&opts.out.join(format!("checkpoint-{}", state.step)), &model, opts, &optim, &state)?;
        }
    }
    pb.finish_and_clear();
    super::peft::save(&model, &opts.lora, &opts.model.display().to_string(), &opts.out)?;
    save_checkpoint(&opts.out.join("checkpoint-last"), &model, opts, &optim, &state)?;
    let plot = if !curve.is_empty() {
        let p = opts.out.join("loss.png");
        let mut series: Vec<crate::plot::Series> = vec![(&curve, crate::plot::BLUE)];
        if !eval_curve.is_empty() {
            series.push((&eval_curve, crate::plot::ORANGE));
        }
        crate::plot::lines_png(&p, &series)?;
        Some(p.display().to_string())
    } else {
        None
    };
    let secs = train_start.elapsed().as_secs_f64();
    Ok(TrainSummary {
        command: "train",
        out: opts.out.display().to_string(),
        steps: state.step,
        trainable_params: trainable,
        total_params,
        trainable_percent: 100.0 * trainable as f64 / total_params as f64,
        first_loss,
        final_loss: last_loss,
        first_eval_loss: first_eval,
        final_eval_loss: last_eval,
        tokens: tokens_total,
        tokens_per_s: tokens_total as f64 / secs.max(1e-9),
        seconds: start.elapsed().as_secs_f64(),
        metrics: metrics_path.display().to_string(),
        plot,
        base_bytes_per_param,
        projection_bytes_per_param,
        peak_memory_mb: peak_rss_mb(),
        device: super::device::describe(&device, model.dtype),
        peak_gpu_memory_mb: peak_gpu,
    })
}

impl TrainSummary {
    pub fn print_human(&self) {
        println!("trained {} step(s) in {:.1}s ({:.0} tokens/s)", self.steps, self.seconds, self.tokens_per_s);
        println!(
            "  trainable parameters: {} of {} ({:.3}%)",
            self.trainable_params, self.total_params, self.trainable_percent
        );
        println!(
            "  base: {:.3} bytes/parameter ({:.3} in the projections); peak memory {:.0} MB on {}",
            self.base_bytes_per_param, self.projection_bytes_per_param, self.peak_memory_mb, self.device
        );
        if let Some(g) = self.peak_gpu_memory_mb {
            println!("  GPU memory in use at most: {g:.0} MB");
        }
        if let (Some(a), Some(b)) = (self.first_loss, self.final_loss) {
            println!("  train loss: {a:.4} -> {b:.4}");
        }
        if let (Some(a), Some(b)) = (self.first_eval_loss, self.final_eval_loss) {
            println!("  eval loss:  {a:.4} -> {b:.4}");
        }
        println!("  adapter:    {}/adapter_model.safetensors (PEFT format)", self.out);
        println!("  metrics:    {}", self.metrics);
        if let Some(p) = &self.plot {
            println!("  loss curve: {p}");
        }
    }
}
