//! Direct preference optimisation on preference shards: the policy is the base model with a LoRA
//! adapter, the reference is the same model with the adapter switched off (no second copy in
//! memory). Losses as TRL's DPOTrainer computes them (trl/trainer/dpo_trainer.py): with
//! `delta = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r))`, sigmoid `-log sigmoid(beta delta)`,
//! hinge `relu(1 - beta delta)`, ipo `(delta_avg - 1 / (2 beta))^2` with per-token averaged log-ratios.

use super::model::Model;
use crate::pack::preference::PreferenceRow;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DpoLoss {
    Sigmoid,
    Hinge,
    Ipo,
}

/// One pair's loss (differentiable in the adapter) and its metrics.
pub struct PairOutcome {
    pub loss: Tensor,
    pub reward_chosen: f64,
    pub reward_rejected: f64,
}

fn trained(labels: &[i32]) -> f64 {
    labels.iter().skip(1).filter(|&&l| l != -100).count().max(1) as f64
}

/// `log(1 + exp(z))`, stable and differentiable.
fn softplus(z: &Tensor) -> candle_core::Result<Tensor> {
    z.relu()? + ((z.abs()?.neg()?.exp()? + 1.0)?.log()?)
}

pub fn pair_loss(model: &Model, p: &PreferenceRow, beta: f64, kind: DpoLoss) -> candle_core::Result<PairOutcome> {
    model.set_lora_enabled(false);
    let rc = model.sequence_logp(&p.chosen_input_ids, &p.chosen_labels, None)?.detach();
    let rr = model.sequence_logp(&p.rejected_input_ids, &p.rejected_labels, None)?.detach();
    model.set_lora_enabled(true);
    let pc = model.sequence_logp(&p.chosen_input_ids, &p.chosen_labels, None)?;
    let pr = model.sequence_logp(&p.rejected_input_ids, &p.rejected_labels, None)?;
    let chosen = (&pc - &rc)?;
    let rejected = (&pr - &rr)?;
    let loss = match kind {
        DpoLoss::Sigmoid => softplus(&((&chosen - &rejected)? * -beta)?)?,
        DpoLoss::Hinge => ((&chosen - &rejected)? * -beta)?.affine(1.0, 1.0)?.relu()?,
        DpoLoss::Ipo => {
            let avg = ((&chosen / trained(&p.chosen_labels))? - (&rejected / trained(&p.rejected_labels))?)?;
            (avg - 1.0 / (2.0 * beta))?.sqr()?
        }
    };
    Ok(PairOutcome {
        loss,
        reward_chosen: beta * chosen.to_scalar::<f32>()? as f64,
        reward_rejected: beta * rejected.to_scalar::<f32>()? as f64,
    })
}

/// What a preference run optimises: DPO on the policy, or a Bradley-Terry reward model.
#[derive(Debug, Clone, Copy)]
pub enum Objective {
    Dpo {
        beta: f64,
        loss: DpoLoss,
    },
    /// `-log sigmoid(r(chosen) - r(rejected))`, as TRL's RewardTrainer.
    Reward,
}

impl Objective {
    pub fn pair(&self, model: &Model, p: &PreferenceRow) -> candle_core::Result<PairOutcome> {
        match *self {
            Objective::Dpo { beta, loss } => pair_loss(model, p, beta, loss),
            Objective::Reward => {
                let rc = model.reward(&p.chosen_input_ids)?;
                let rr = model.reward(&p.rejected_input_ids)?;
                let loss = softplus(&(&rr - &rc)?)?;
                Ok(PairOutcome {
                    loss,
                    reward_chosen: rc.to_scalar::<f32>()? as f64,
                    reward_rejected: rr.to_scalar::<f32>()? as f64,
                })
            }
        }
    }
}

/// Held-out preference metrics: mean loss, reward accuracy (chosen above rejected) and margin.
pub fn evaluate(model: &Model, pairs: &[PreferenceRow], objective: Objective) -> candle_core::Result<(f64, f64, f64)> {
    let (mut loss, mut acc, mut margin) = (0.0, 0.0, 0.0);
    for p in pairs {
        let o = super::fused::no_grad(|| objective.pair(model, p))?;
        loss += o.loss.to_scalar::<f32>()? as f64;
        acc += (o.reward_chosen > o.reward_rejected) as u8 as f64;
        margin += o.reward_chosen - o.reward_rejected;
    }
    let n = pairs.len().max(1) as f64;
    Ok((loss / n, acc / n, margin / n))
}

/// `tunekit train --method dpo`: AdamW on the adapter over preference pairs (`--grad-accum` pairs per
/// step, the loss averaged over them), metrics per step, held-out evaluation, PEFT adapter out.
pub fn run(
    opts: &super::run::TrainOptions,
    objective: Objective,
    resume: Option<&std::path::Path>,
) -> anyhow::Result<serde_json::Value> {
    use super::optim::{clip_grad_norm, lr_at, AdamW};
    use anyhow::{bail, Context};
    use serde_json::json;
    use std::io::Write;
    let start = std::time::Instant::now();
    if opts.gradient_checkpointing {
        bail!("--gradient-checkpointing is for --method sft; DPO and reward runs keep the plain backward");
    }
    let mut t = super::run::load_trainable(opts)?;
    if matches!(objective, Objective::Reward) {
        t.model.add_score_head(opts.seed)?;
        let head = t.model.score.clone().expect("just added");
        t.vars_named.push(("base_model.model.score.weight".into(), head.clone()));
        t.vars.push(head);
    }
    let pairs_of = |split: &str| -> anyhow::Result<Vec<PreferenceRow>> {
        let f = opts.data.join(format!("{split}-00000-of-00001.parquet"));
        if !f.exists() {
            return Ok(vec![]);
        }
        crate::pack::preference::read_pairs(&f)
    };
    let train = pairs_of("train")?;
    let eval = pairs_of("eval")?;
    if train.is_empty() {
        bail!("{}: no preference pairs; prepare them with `tunekit prepare --method preference`", opts.data.display());
    }
    let per_step = opts.grad_accum.max(1);
    let steps_per_epoch = train.len().div_ceil(per_step) as u64;
    let total = opts.max_steps.unwrap_or(steps_per_epoch * opts.epochs.max(1));
    let mut optim = AdamW::new(opts.optim.clone(), &t.vars)?;
    let first_step = match resume {
        Some(dir) => super::run::read_checkpoint(dir, &t.vars_named, &mut optim)?["step"].as_u64().unwrap_or(0),
        None => 0,
    };
    std::fs::create_dir_all(&opts.out)?;
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(resume.is_some())
        .truncate(resume.is_none())
        .open(opts.out.join("metrics.jsonl"))?;
    let head_writer = |dir: &std::path::Path| -> anyhow::Result<()> {
        match (&objective, &t.model.score) {
            (Objective::Reward, Some(h)) => super::peft::save_reward_head(dir, h.as_tensor()),
            _ => Ok(()),
        }
    };
    let pb = crate::progress::bar(if matches!(objective, Objective::Reward) { "reward" } else { "dpo" }, total);
    let first_eval =
        if eval.is_empty() || resume.is_some() { None } else { Some(evaluate(&t.model, &eval, objective)?) };
    if let Some((l, a, m)) = first_eval {
        writeln!(
            metrics,
            "{}",
            json!({"step": 0, "eval_loss": l, "eval_reward_accuracy": a, "eval_reward_margin": m})
        )?;
    }
    let mut curve = Vec::new();
    let mut last_eval = first_eval;
    pb.set_position(first_step);
    // The current epoch's pair order, reshuffled only when the epoch changes.
    let mut order: (Option<u64>, Vec<usize>) = (None, Vec::new());
    let mut pair_seconds = (0usize, 0.0f64);
    for step in first_step..total {
        let t0 = std::time::Instant::now();
        let epoch = step / steps_per_epoch;
        if order.0 != Some(epoch) {
            let mut o: Vec<usize> = (0..train.len()).collect();
            crate::split::SplitMix64::new(opts.seed ^ epoch.wrapping_mul(0x9E37)).shuffle(&mut o);
            order = (Some(epoch), o);
        }
        let order = &order.1;
        let at = (step % steps_per_epoch) as usize * per_step;
        let chunk: Vec<usize> = order[at..(at + per_step).min(order.len())].to_vec();
        let (mut loss, mut rc, mut rr, mut acc) = (0.0, 0.0, 0.0, 0.0);
        let mut grads: Option<Vec<Tensor>> = None;
        for &i in &chunk {
            let o = objective.pair(&t.model, &train[i])?;
            loss += o.loss.to_scalar::<f32>()? as f64;
            rc += o.reward_chosen;
            rr += o.reward_rejected;
            acc += (o.reward_chosen > o.reward_rejected) as u8 as f64;
            let store = (o.loss / chunk.len() as f64)?.backward()?;
            let g: Vec<Tensor> = t
                .vars_named
                .iter()
                .map(|(n, v)| store.get(v.as_tensor()).cloned().with_context(|| format!("no gradient for {n}")))
                .collect::<anyhow::Result<_>>()?;
            grads = Some(match grads {
                None => g,
                Some(a) => a.iter().zip(g).map(|(x, y)| x + y).collect::<candle_core::Result<_>>()?,
            });
        }
        let n = chunk.len() as f64;
        let mut g = grads.context("empty step")?;
        let grad_norm = clip_grad_norm(&mut g, opts.max_grad_norm)?;
        let lr = lr_at(opts.optim.lr, step, opts.warmup_steps, total, opts.schedule);
        optim.update(&t.vars, &g, lr)?;
        if !(loss / n).is_finite() {
            bail!("step {}: the DPO loss is not finite; stopping", step + 1);
        }
        let dt = t0.elapsed().as_secs_f64();
        pair_seconds = (pair_seconds.0 + chunk.len(), pair_seconds.1 + dt);
        let mut rec = json!({
            "step": step + 1, "loss": loss / n, "lr": lr, "grad_norm": grad_norm, "pairs_per_s": n / dt,
            "rewards/chosen": rc / n, "rewards/rejected": rr / n, "rewards/accuracies": acc / n,
            "rewards/margins": (rc - rr) / n,
            // KL estimate: mean policy-minus-reference log-ratio of the chosen and rejected answers.
            "kl": match objective {
                Objective::Dpo { beta, .. } => json!((rc + rr) / (2.0 * n * beta)),
                Objective::Reward => json!(null),
            },
        });
        curve.push(((step + 1) as f64, loss / n));
        if opts.eval_every > 0 && !eval.is_empty() && ((step + 1) % opts.eval_every == 0 || step + 1 == total) {
            let (l, a, m) = evaluate(&t.model, &eval, objective)?;
            rec["eval_loss"] = json!(l);
            rec["eval_reward_accuracy"] = json!(a);
            rec["eval_reward_margin"] = json!(m);
            last_eval = Some((l, a, m));
        }
        writeln!(metrics, "{rec}")?;
        pb.set_message(format!("loss {:.4} acc {:.2}", loss / n, acc / n));
        pb.inc(1);
        if opts.save_every > 0 && (step + 1) % opts.save_every == 0 && step + 1 < total {
            let dir = opts.out.join(format!("checkpoint-{}", step + 1));
            super::run::write_checkpoint(&dir, &t.model, opts, &optim, json!({"step": step + 1}), &head_writer)?;
        }
    }
    pb.finish_and_clear();
    super::peft::save(&t.model, &opts.lora, &opts.model.display().to_string(), &opts.out)?;
    if let (Objective::Reward, Some(head)) = (objective, &t.model.score) {
        super::peft::save_reward_head(&opts.out, head.as_tensor())?;
    }
    if !curve.is_empty() {
        crate::plot::lines_png(&opts.out.join("loss.png"), &[(&curve, crate::plot::BLUE)])?;
    }
    Ok(json!({
        "command": "train",
        "method": match objective { Objective::Dpo { .. } => "dpo", Objective::Reward => "reward" },
        "objective": format!("{objective:?}"), "steps": total,
        "pairs": train.len(), "eval_pairs": eval.len(),
        "trainable_params": t.trainable, "total_params": t.total_params,
        "first_eval": first_eval.map(|(l, a, m)| json!({"loss": l, "reward_accuracy": a, "reward_margin": m})),
        "final_eval": last_eval.map(|(l, a, m)| json!({"loss": l, "reward_accuracy": a, "reward_margin": m})),
        "out": opts.out.display().to_string(), "seconds": start.elapsed().as_secs_f64(),
        "pairs_per_s": pair_seconds.0 as f64 / pair_seconds.1.max(1e-9),
        "device": super::device::describe(&t.model.device, t.model.dtype),
    }))
}
