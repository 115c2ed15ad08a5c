//! `train --method rloo`: REINFORCE leave-one-out on prompt shards with the GRPO rollout engine
//! ([`super::rl`]): each rollout samples `--num-generations` completions of `--prompts-per-step`
//! prompts, keeps their log-probabilities at sampling time and, with `--beta` > 0, under the
//! reference (the base with the adapter off) for the KL penalty on the rewards; the advantages are
//! leave-one-out ([`crate::train::objectives::rloo`]); each step's loss is the clipped objective
//! with one ratio per completion over all the rollout's completions (micro-batched by
//! `--batch-tokens`).

use super::grpo::logps_of;
use super::rl::{completion_metrics, reward_metrics, Rl, Seq};
use crate::train::model::Model;
use crate::train::objectives::rloo::{advantages, Rloo, SeqStats};
use crate::train::options::TrainOptions;
use crate::train::trainer::{grads_of, load_trainable, train, GradSum, Metrics, Recipe, Step, TrainSummary, Trainable};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::path::Path;

pub fn run(opts: &TrainOptions, rloo: Rloo, resume: Option<&Path>) -> Result<TrainSummary> {
    if opts.rl.num_generations < 2 {
        bail!(
            "--method rloo needs --num-generations of at least 2: each completion's baseline is the mean of its \
             group's others (got {})",
            opts.rl.num_generations
        );
    }
    let t = load_trainable(opts, resume)?;
    let recipe = RlooRecipe { rl: Rl::new(opts, &t.model)?, rloo, rollout: None };
    train(opts, t, recipe, resume)
}

/// A rollout with what its optimizer steps need.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Rollout {
    index: u64,
    seqs: Vec<Seq>,
    advantages: Vec<f64>,
    /// Per completion, its summed log-probability at sampling time.
    old_logps: Vec<f64>,
    metrics: Map<String, Value>,
}

struct RlooRecipe<'a> {
    rl: Rl<'a>,
    rloo: Rloo,
    rollout: Option<Rollout>,
}

impl RlooRecipe<'_> {
    /// Samples and scores rollout `index` with the model as it is now.
    fn new_rollout(&mut self, model: &Model, index: u64, step: u64) -> Result<Rollout> {
        let (seqs, (gen_s, gen_tokens)) = self.rl.rollout(model, index)?;
        let old = logps_of(&self.rl, model, &seqs)?;
        let (kl, kl_tokens) = match self.rloo.beta != 0.0 {
            true => {
                model.set_lora_enabled(false);
                let refs = logps_of(&self.rl, model, &seqs);
                model.set_lora_enabled(true);
                let refs = refs?;
                let per_seq: Vec<f64> =
                    old.iter().zip(&refs).map(|(o, r)| o.iter().zip(r).map(|(a, b)| (a - b) as f64).sum()).collect();
                let tokens: usize = old.iter().map(|o| o.len()).sum();
                (per_seq, tokens)
            }
            false => (vec![0.0; seqs.len()], 0),
        };
        let rewards: Vec<f64> = seqs.iter().map(|s| s.reward).collect();
        let n_gen = self.rl.opts.rl.num_generations;
        let (penalised, adv) = advantages(&rewards, &kl, self.rloo.beta, n_gen, self.rloo.normalize_advantages);
        let mut metrics = reward_metrics(&seqs, &self.rl.rewards.names());
        // TRL logs the penalised rewards as `reward`; the functions' own stay under rewards/NAME.
        let n = penalised.len().max(1) as f64;
        metrics.insert("reward".into(), json!(penalised.iter().sum::<f64>() / n));
        if self.rloo.beta != 0.0 {
            metrics.insert("kl".into(), json!(kl.iter().sum::<f64>() / kl_tokens.max(1) as f64));
        }
        metrics.extend(completion_metrics(&seqs));
        metrics.insert("gen_tokens_per_s".into(), json!(gen_tokens as f64 / gen_s.max(1e-9)));
        metrics.insert("gen_seconds".into(), json!(gen_s));
        self.rl.log(step + 1, &seqs, &adv)?;
        let old_logps = old.iter().map(|o| o.iter().map(|&x| x as f64).sum()).collect();
        Ok(Rollout { index, seqs, advantages: adv, old_logps, metrics })
    }
}

/// Each completion's summed log-probability from its tokens' [N] (the completions tile them).
fn per_completion(token_logps: &Tensor, lengths: &[usize]) -> candle_core::Result<Tensor> {
    let mut parts = Vec::with_capacity(lengths.len());
    let mut at = 0;
    for &l in lengths {
        parts.push(token_logps.narrow(0, at, l)?.sum_keepdim(0)?);
        at += l;
    }
    Tensor::cat(&parts, 0)
}

impl Recipe for RlooRecipe<'_> {
    const EXAMPLES: &'static str = "completions";
    const DATA: &'static str = "prompts";

    fn name(&self) -> &'static str {
        "rloo"
    }

    fn examples(&self) -> (usize, usize) {
        (self.rl.train.len(), self.rl.eval.len())
    }

    fn steps_per_epoch(&self) -> u64 {
        self.rl.rollouts_per_epoch() * self.rloo.num_iterations.max(1) as u64
    }

    fn eval_key(&self) -> &'static str {
        "reward"
    }

    fn step(&mut self, t: &Trainable, step: u64) -> Result<Step> {
        let model = &t.model;
        let index = step / self.rloo.num_iterations.max(1) as u64;
        if self.rollout.as_ref().map(|r| r.index) != Some(index) {
            let r = self.new_rollout(model, index, step)?;
            self.rollout = Some(r);
        }
        let r = self.rollout.as_ref().context("a rollout was just made")?;
        let micro = self.rl.micro_batches(&r.seqs);
        let total = r.seqs.len();
        let dev = &model.device;
        let (mut sum, mut loss, mut tokens, mut examples) = (GradSum::default(), 0.0, 0usize, 0);
        let (mut stats, mut entropy, mut entropy_tokens) = (SeqStats::default(), 0.0f64, 0.0f64);
        for (_, mb) in self.rl.world.share(&micro) {
            examples += mb.len();
            let batch = self.rl.batch_of(&r.seqs, mb, dev)?;
            tokens += batch.tokens;
            let (lp, ent) = model.token_log_probs(&batch, self.rl.opts.rl.sampling.temperature, true)?;
            let lengths: Vec<usize> = mb.iter().map(|&i| r.seqs[i].tokens.len()).collect();
            let logps = per_completion(&lp, &lengths)?;
            let pick = |v: &[f64]| Tensor::from_vec(mb.iter().map(|&i| v[i] as f32).collect::<Vec<_>>(), mb.len(), dev);
            let (old, adv) = (pick(&r.old_logps)?, pick(&r.advantages)?);
            let (l, s) = self.rloo.loss(&logps, &old, &adv, total)?;
            loss += l.to_scalar::<f32>()? as f64;
            let ent = ent.context("entropies were asked for")?;
            entropy += ent.sum_all()?.to_scalar::<f32>()? as f64;
            entropy_tokens += ent.dim(0)? as f64;
            stats.completions += s.completions;
            stats.low_clipped += s.low_clipped;
            stats.high_clipped += s.high_clipped;
            sum.add(grads_of(&t.vars_named, &l.backward()?)?)?;
        }
        let mut all = [stats.completions, stats.low_clipped, stats.high_clipped, entropy, entropy_tokens];
        self.rl.world.sum_f64(&mut all)?;
        let [completions, low, high, entropy, entropy_tokens] = all;
        let n = completions.max(1.0);
        let mut metrics = r.metrics.clone();
        metrics.insert("entropy".into(), json!(entropy / entropy_tokens.max(1.0)));
        metrics.insert("clip_ratio/low_mean".into(), json!(low / n));
        metrics.insert("clip_ratio/high_mean".into(), json!(high / n));
        metrics.insert("clip_ratio/region_mean".into(), json!((low + high) / n));
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
