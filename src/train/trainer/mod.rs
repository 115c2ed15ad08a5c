//! The loop every training method shares, read top to bottom in [`train`]: resume, then each
//! optimizer step the recipe's gradients (summed over the ranks of a data-parallel run), clipping,
//! the learning-rate schedule and AdamW, a metrics record, held-out evaluation and checkpoints on
//! their cadence; at the end the adapter, the chart, the report and the summary.
//!
//! Its pieces: [`recipe`] what a method gives the loop; [`trainable`] the model ready to train;
//! [`log`] metrics.jsonl, TensorBoard and the curves; [`checkpoints`] resume and save;
//! [`ranks`] the data-parallel sum; [`outputs`] the memory probe and the run's ends.

pub mod checkpoints;
pub mod log;
pub mod outputs;
pub mod ranks;
pub mod recipe;
pub mod trainable;

use crate::train::optim::{clip_grad_norm, lr_at, AdamW};
use crate::train::options::TrainOptions;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use log::{RunLog, Update};
pub use outputs::{MemoryBreakdown, Probe, TrainSummary};
pub use recipe::{grads_of, GradSum, Metrics, Recipe, Step};
use serde_json::json;
use std::path::Path;
use std::time::Instant;
pub use trainable::{load_trainable, placement, Trainable};

/// Runs `recipe` to the end of its steps with the options' optimizer, schedule and cadences. In a
/// data-parallel run every rank runs its share of each step; rank 0 alone writes metrics,
/// checkpoints, the adapter and the report.
pub fn train<R: Recipe>(
    opts: &TrainOptions,
    t: Trainable,
    mut recipe: R,
    resume: Option<&Path>,
) -> Result<TrainSummary> {
    let start = Instant::now();
    let loaded_peak_mb = crate::train::device::peak_rss_mb();
    // What loading the models and data freed goes back before the steps start.
    crate::allocator::release_freed_memory();
    crate::allocator::hold_between_steps(recipe.largest_micro_batch_tokens());
    let world = crate::cluster::world();
    if world.size > 1 {
        world.check_same(ranks::run_digest(opts)?, "options or data")?;
    }
    let mut optim = AdamW::new(opts.optim.clone(), &t.vars_named)?;
    let mut step = match resume {
        Some(dir) => checkpoints::resume(dir, &t, &mut optim, &mut recipe)?,
        None => 0,
    };
    let total = opts.max_steps.unwrap_or(recipe.steps_per_epoch() * opts.epochs.max(1));
    std::fs::create_dir_all(&opts.out).with_context(|| format!("cannot create {}", opts.out.display()))?;
    let mut log = RunLog::open(opts, resume.is_some(), &t.model.device)?;
    let pb = crate::progress::bar(recipe.name(), total);
    pb.set_position(step);
    let probe = if opts.probe_memory { outputs::probe_memory(&mut recipe, &t)? } else { None };
    let training = Instant::now();
    if resume.is_none() && evaluation_due(opts, 0, total) {
        if let Some(m) = recipe.evaluate(&t.model)? {
            let mut rec = json!({"step": 0});
            log.eval(0, m, recipe.eval_key(), &mut rec);
            log.write(&rec)?;
        }
    }
    while step < total {
        let t0 = Instant::now();
        let mut s = recipe.step(&t, step)?;
        let all_reduce = match world.distributed() {
            true => Some((ranks::sum_over_ranks(world, &mut s, &t.vars)?, t.trainable_params())),
            false => None,
        };
        if !s.loss.is_finite() {
            let kept = opts.out.display();
            bail!("step {}: the loss is {}; stopping. The last good checkpoint is kept in {kept}", step + 1, s.loss);
        }
        let update = optimizer_step(opts, &t, &mut optim, std::mem::take(&mut s.grads), step, total)?;
        step += 1;
        let dt = t0.elapsed().as_secs_f64();
        let message = format!("loss {:.4} lr {:.2e} {:.0} tok/s", s.loss, update.lr, s.tokens as f64 / dt);
        let mut rec = log.step(step, s, &update, dt, R::EXAMPLES, all_reduce);
        if evaluation_due(opts, step, total) {
            if let Some(m) = recipe.evaluate(&t.model)? {
                log.eval(step, m, recipe.eval_key(), &mut rec);
            }
        }
        log.write(&rec)?;
        pb.set_message(message);
        pb.set_position(step);
        if opts.save_every > 0 && step.is_multiple_of(opts.save_every) && step < total {
            checkpoints::save(&opts.out.join(format!("checkpoint-{step}")), opts, &t, &recipe, &optim, step)?;
        }
    }
    pb.finish_and_clear();
    outputs::finish(opts, &t, &recipe, &optim, step, log, probe, outputs::Clock { start, training, loaded_peak_mb })
}

/// Whether held-out evaluation runs after `step` (0: before the first): every `--eval-every` steps
/// and after the last, on rank 0 (every rank holds the same adapter).
fn evaluation_due(opts: &TrainOptions, step: u64, total: u64) -> bool {
    let every = opts.eval_every;
    crate::cluster::world().is_main() && every > 0 && (step == 0 || step.is_multiple_of(every) || step == total)
}

/// Clips the step's gradients, takes the learning rate of `step` (0-based) and applies AdamW;
/// freed memory goes back to the allocator before the next step.
fn optimizer_step(
    opts: &TrainOptions,
    t: &Trainable,
    optim: &mut AdamW,
    mut grads: Vec<Tensor>,
    step: u64,
    total: u64,
) -> Result<Update> {
    // TUNEKIT_PROFILE=1: the optimizer's seconds in metrics.jsonl (adds a device sync).
    let profile = std::env::var_os("TUNEKIT_PROFILE").is_some();
    let t0 = Instant::now();
    let grad_norm = clip_grad_norm(&mut grads, opts.max_grad_norm)?;
    let lr = lr_at(opts.optim.lr, step, opts.warmup_steps, total, opts.schedule);
    optim.update(&t.vars, &grads, lr)?;
    drop(grads);
    if profile {
        t.model.device.synchronize()?;
    }
    Ok(Update { lr, grad_norm, seconds: profile.then(|| t0.elapsed().as_secs_f64()) })
}
