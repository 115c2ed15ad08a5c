//! `train --method grpo`: group relative policy optimisation on prompt shards. Each rollout samples
//! `--num-generations` completions of `--prompts-per-step` prompts with the policy itself, scores
//! them with the `--reward` functions and turns the rewards into group-relative advantages; each
//! optimizer step then computes the GRPO loss over all the rollout's completions (micro-batched by
//! `--batch-tokens`). With `--num-iterations` > 1 a rollout serves that many steps, with the
//! log-probabilities at sampling time stored; with `--beta` > 0 the KL to the reference (the base
//! with the adapter off) is added.

use super::rl::{completion_metrics, reward_metrics, Rl, Seq};
use crate::train::graph::no_grad;
use crate::train::model::Model;
use crate::train::objectives::grpo::{advantages, Grpo, TokenBatch, TokenStats};
use crate::train::options::TrainOptions;
use crate::train::trainer::{grads_of, load_trainable, train, GradSum, Metrics, Recipe, Step, TrainSummary, Trainable};
use anyhow::{Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::path::Path;

pub fn run(opts: &TrainOptions, grpo: Grpo, resume: Option<&Path>) -> Result<TrainSummary> {
    let t = load_trainable(opts, resume)?;
    let recipe = GrpoRecipe { rl: Rl::new(opts, &t.model)?, grpo, rollout: None };
    train(opts, t, recipe, resume)
}

/// A rollout with what its optimizer steps need.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Rollout {
    index: u64,
    seqs: Vec<Seq>,
    advantages: Vec<f64>,
    /// Per completion, its tokens' log-probabilities at sampling time (with --num-iterations > 1).
    old_logps: Option<Vec<Vec<f32>>>,
    /// Per completion, under the reference (with --beta > 0).
    ref_logps: Option<Vec<Vec<f32>>>,
    /// Its reward, completion and sampling metrics.
    metrics: Map<String, Value>,
}

struct GrpoRecipe<'a> {
    rl: Rl<'a>,
    grpo: Grpo,
    rollout: Option<Rollout>,
}

/// Per completion, its tokens' log-probabilities under the model as it is (no graph); each rank
/// computes its micro-batches' and every rank gets all.
pub(super) fn logps_of(rl: &Rl, model: &Model, seqs: &[Seq]) -> Result<Vec<Vec<f32>>> {
    let mut mine = vec![];
    for (_, mb) in rl.world.share(&rl.micro_batches(seqs)) {
        let batch = rl.batch_of(seqs, mb, &model.device)?;
        let (lp, _) = no_grad(|| model.token_log_probs(&batch, rl.opts.rl.sampling.temperature, false))?;
        let lp = lp.to_vec1::<f32>()?;
        let mut at = 0;
        for &i in mb {
            let n = seqs[i].tokens.len();
            mine.push((i, lp[at..at + n].to_vec()));
            at += n;
        }
    }
    rl.gather_per_seq(mine, seqs.len())
}

impl GrpoRecipe<'_> {
    /// Samples and scores rollout `index` with the model as it is now.
    fn new_rollout(&mut self, model: &Model, index: u64, step: u64) -> Result<Rollout> {
        let (seqs, (gen_s, gen_tokens)) = self.rl.rollout(model, index)?;
        let rewards: Vec<f64> = seqs.iter().map(|s| s.reward).collect();
        let (adv, zero) = advantages(&rewards, self.rl.opts.rl.num_generations, self.grpo.scale_rewards);
        let old_logps = if self.grpo.num_iterations > 1 { Some(logps_of(&self.rl, model, &seqs)?) } else { None };
        let ref_logps = if self.grpo.beta != 0.0 {
            model.set_lora_enabled(false);
            let r = logps_of(&self.rl, model, &seqs);
            model.set_lora_enabled(true);
            Some(r?)
        } else {
            None
        };
        let mut metrics = reward_metrics(&seqs, &self.rl.rewards.names());
        metrics.insert(
            "frac_reward_zero_std".into(),
            json!(zero.iter().filter(|&&z| z).count() as f64 / zero.len() as f64),
        );
        metrics.extend(completion_metrics(&seqs));
        metrics.insert("gen_tokens_per_s".into(), json!(gen_tokens as f64 / gen_s.max(1e-9)));
        metrics.insert("gen_seconds".into(), json!(gen_s));
        self.rl.log(step + 1, &seqs, &adv)?;
        Ok(Rollout { index, seqs, advantages: adv, old_logps, ref_logps, metrics })
    }
}

impl Recipe for GrpoRecipe<'_> {
    const EXAMPLES: &'static str = "completions";
    const DATA: &'static str = "prompts";

    fn name(&self) -> &'static str {
        "grpo"
    }

    fn examples(&self) -> (usize, usize) {
        (self.rl.train.len(), self.rl.eval.len())
    }

    fn steps_per_epoch(&self) -> u64 {
        self.rl.rollouts_per_epoch() * self.grpo.num_iterations.max(1) as u64
    }

    fn eval_key(&self) -> &'static str {
        "reward"
    }

    fn step(&mut self, t: &Trainable, step: u64) -> Result<Step> {
        let model = &t.model;
        let index = step / self.grpo.num_iterations.max(1) as u64;
        if self.rollout.as_ref().map(|r| r.index) != Some(index) {
            let r = self.new_rollout(model, index, step)?;
            self.rollout = Some(r);
        }
        let r = self.rollout.as_ref().context("a rollout was just made")?;
        let micro = self.rl.micro_batches(&r.seqs);
        let lengths: Vec<usize> = r.seqs.iter().map(|s| s.tokens.len()).collect();
        let masked: Vec<bool> = r.seqs.iter().map(|s| self.grpo.mask_truncated && !s.finished).collect();
        let weights = self.grpo.token_weights(&lengths, &masked, &micro, self.rl.opts.rl.sampling.max_new_tokens);
        let dev = &model.device;
        let per_token = |v: &dyn Fn(usize) -> Vec<f32>, mb: &[usize]| -> candle_core::Result<Tensor> {
            let flat: Vec<f32> = mb.iter().flat_map(|&i| v(i)).collect();
            Tensor::from_vec(flat.clone(), flat.len(), dev)
        };
        let (mut sum, mut loss, mut tokens, mut examples) = (GradSum::default(), 0.0, 0usize, 0);
        let (mut stats, mut entropy) = (TokenStats::default(), 0.0f64);
        for (k, mb) in self.rl.world.share(&micro) {
            let w = &weights[k];
            examples += mb.len();
            let batch = self.rl.batch_of(&r.seqs, mb, dev)?;
            tokens += batch.tokens;
            let (logps, ent) = model.token_log_probs(&batch, self.rl.opts.rl.sampling.temperature, true)?;
            let ent = ent.context("entropies were asked for")?;
            let adv = per_token(&|i| vec![r.advantages[i] as f32; lengths[i]], mb)?;
            let old = match &r.old_logps {
                Some(o) => Some(per_token(&|i| o[i].clone(), mb)?),
                None => None,
            };
            let refs = match &r.ref_logps {
                Some(o) => Some(per_token(&|i| o[i].clone(), mb)?),
                None => None,
            };
            let weights = Tensor::from_vec(w.clone(), w.len(), dev)?;
            let mb_lengths: Vec<usize> = mb.iter().map(|&i| lengths[i]).collect();
            let tb = TokenBatch {
                lengths: &mb_lengths,
                logps: &logps,
                old_logps: old.as_ref(),
                ref_logps: refs.as_ref(),
                advantages: &adv,
                weights: &weights,
            };
            let (l, s) = self.grpo.loss(&tb)?;
            loss += l.to_scalar::<f32>()? as f64;
            entropy += ent.sum_all()?.to_scalar::<f32>()? as f64;
            stats.tokens += s.tokens;
            stats.kl += s.kl;
            stats.low_clipped += s.low_clipped;
            stats.high_clipped += s.high_clipped;
            sum.add(grads_of(&t.vars_named, &l.backward()?)?)?;
        }
        // The token statistics of the whole step, over every rank.
        let mut all = [stats.tokens, stats.kl, stats.low_clipped, stats.high_clipped, entropy];
        self.rl.world.sum_f64(&mut all)?;
        let [tokens_all, kl, low, high, entropy] = all;
        (stats.kl, stats.low_clipped, stats.high_clipped) = (kl, low, high);
        let n = tokens_all.max(1.0);
        let mut metrics = r.metrics.clone();
        metrics.insert("entropy".into(), json!(entropy / n));
        if self.grpo.beta != 0.0 {
            metrics.insert("kl".into(), json!(stats.kl / n));
        }
        metrics.insert("clip_ratio/low_mean".into(), json!(stats.low_clipped / n));
        metrics.insert("clip_ratio/high_mean".into(), json!(stats.high_clipped / n));
        metrics.insert("clip_ratio/region_mean".into(), json!((stats.low_clipped + stats.high_clipped) / n));
        let grads = sum.finish(t, "the rollout has no completion token")?;
        Ok(Step { loss, grads, tokens, examples, metrics })
    }

    fn evaluate(&mut self, model: &Model) -> Result<Option<Metrics>> {
        self.rl.evaluate(model)
    }

    fn state(&self) -> Map<String, Value> {
        super::rl::rollout_state(&self.rollout)
    }

    fn restore(&mut self, state: &Value) -> Result<()> {
        self.rollout = self.rl.restore_rollout(state)?;
        Ok(())
    }
}
