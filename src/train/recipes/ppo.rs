//! `train --method ppo`: the RLHF loop. Each rollout samples completions of `--prompts-per-step`
//! prompts with the policy, scores each at its end with the `--reward` (usually `model:DIR`, a reward
//! model), and turns score and per-token KL penalty (`--kl-coef`, against the base with the adapter
//! off) into per-token rewards and GAE advantages; then `--ppo-epochs` passes over it in
//! `--num-mini-batches` mini-batches, one optimizer step each, with the clipped policy and value
//! losses. The value head is a [1, hidden] projection of the policy's own final hidden states, so it
//! shares the policy's LoRA body; it starts from the reward model's score head when there is one.

use super::rl::{completion_metrics, reward_metrics, Rl, Seq};
use crate::split::SplitMix64;
use crate::train::adapters::score::{new_score_head, SCORE_WEIGHT};
use crate::train::graph::no_grad;
use crate::train::model::batch::Batch;
use crate::train::model::Model;
use crate::train::objectives::ppo::{Ppo, Processed};
use crate::train::options::TrainOptions;
use crate::train::rewards::RewardKind;
use crate::train::trainer::checkpoints::EXTRA_VARS;
use crate::train::trainer::{grads_of, load_trainable, train, GradSum, Metrics, Recipe, Step, TrainSummary, Trainable};
use anyhow::{Context, Result};
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::path::Path;

pub const VALUE_HEAD: &str = "value_head.weight";

pub fn run(opts: &TrainOptions, ppo: Ppo, resume: Option<&Path>) -> Result<TrainSummary> {
    let mut t = load_trainable(opts, resume)?;
    let rl = Rl::new(opts, &t.model)?;
    let value_head = Var::from_tensor(&initial_value_head(opts, &t.model)?)?;
    t.add_var(VALUE_HEAD, value_head.clone());
    let recipe = PpoRecipe { rl, ppo, value_head, rollout: None };
    train(opts, t, recipe, resume)
}

/// The reward model's score head when a `model:DIR` reward has one of the policy's width, else a
/// fresh head as transformers initialises one.
fn initial_value_head(opts: &TrainOptions, model: &Model) -> Result<Tensor> {
    let hidden = model.config.hidden_size;
    for spec in &opts.rl.rewards {
        if let RewardKind::Model(dir) = &spec.kind {
            // An adapter's head, or a full reward model's (a sequence classifier's `score.weight`).
            let (t, key) = match dir.join("adapter_config.json").exists() {
                true => (crate::train::io::peft::read(dir)?.1, SCORE_WEIGHT),
                false => (crate::train::io::hf::read_tensors(dir, &["score.weight"])?, "score.weight"),
            };
            if let Some(h) = t.get(key).filter(|h| h.dims() == [1, hidden]) {
                return Ok(h.to_dtype(DType::F32)?.to_device(&model.device)?);
            }
        }
    }
    Ok(new_score_head(hidden, opts.seed ^ 0x7A1, &model.device)?.as_tensor().clone())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Rollout {
    index: u64,
    seqs: Vec<Seq>,
    /// Per completion: log-probabilities at sampling time, values at its value positions.
    old_logps: Vec<Vec<f64>>,
    values: Vec<Vec<f64>>,
    processed: Processed,
    /// Per PPO epoch, the order of the completions (mini-batches are consecutive runs of it).
    orders: Vec<Vec<usize>>,
    metrics: Map<String, Value>,
}

struct PpoRecipe<'a> {
    rl: Rl<'a>,
    ppo: Ppo,
    value_head: Var,
    rollout: Option<Rollout>,
}

/// Where each completion's value positions are in a packed batch of `idx`: its completion tokens'
/// predicting positions, and its last token when the completion is shorter than `width`.
fn value_positions(rl: &Rl, seqs: &[Seq], idx: &[usize], width: usize) -> Vec<u32> {
    let mut out = vec![];
    let mut start = 0;
    for &i in idx {
        let (p, n) = (rl.train[seqs[i].prompt].prompt_ids.len(), seqs[i].tokens.len());
        let count = if n < width { n + 1 } else { n };
        out.extend((0..count).map(|t| (start + p - 1 + t) as u32));
        start += p + n;
    }
    out
}

impl PpoRecipe<'_> {
    /// Log-probabilities (with their entropies when asked) and values of a batch from one forward,
    /// differentiable unless in no_grad.
    fn forward(
        &self,
        model: &Model,
        batch: &Batch,
        positions: &[u32],
        entropy: bool,
    ) -> candle_core::Result<(Tensor, Option<Tensor>, Tensor)> {
        let h = model.hidden(&batch.input_ids, &batch.position_ids, &batch.seq_lengths, None)?;
        let (logps, entropy) = model.log_probs_at(&h, batch, self.rl.opts.rl.sampling.temperature, entropy)?;
        let at = Tensor::from_vec(positions.to_vec(), positions.len(), &model.device)?;
        let v = h.index_select(&at, 0)?.to_dtype(DType::F32)?.matmul(&self.value_head.as_tensor().t()?)?.squeeze(1)?;
        Ok((logps, entropy, v))
    }

    fn new_rollout(&mut self, model: &Model, index: u64, step: u64) -> Result<Rollout> {
        let (seqs, (gen_s, gen_tokens)) = self.rl.rollout(model, index)?;
        let mut scores: Vec<f64> = seqs.iter().map(|s| s.reward).collect();
        if let Some(p) = self.ppo.missing_eos_penalty {
            for (s, q) in scores.iter_mut().zip(&seqs) {
                if !q.finished {
                    *s -= p;
                }
            }
        }
        let width = seqs.iter().map(|s| s.tokens.len()).max().unwrap_or(0);
        // Each rank computes its micro-batches' log-probabilities, reference log-probabilities and
        // values; every rank then holds all, and processes the whole rollout as one process would.
        let mut mine = vec![];
        for (_, mb) in self.rl.world.share(&self.rl.micro_batches(&seqs)) {
            let batch = self.rl.batch_of(&seqs, mb, &model.device)?;
            let pos = value_positions(&self.rl, &seqs, mb, width);
            let (lp, _, v) = no_grad(|| self.forward(model, &batch, &pos, false))?;
            model.set_lora_enabled(false);
            let rp = no_grad(|| model.token_log_probs(&batch, self.rl.opts.rl.sampling.temperature, false));
            model.set_lora_enabled(true);
            let (lp, rp, v) = (lp.to_vec1::<f32>()?, rp?.0.to_vec1::<f32>()?, v.to_vec1::<f32>()?);
            let (mut a, mut b) = (0, 0);
            let wide = |x: &[f32]| x.iter().map(|&x| x as f64).collect::<Vec<f64>>();
            for &i in mb {
                let n = seqs[i].tokens.len();
                let m = if n < width { n + 1 } else { n };
                mine.push((i, (wide(&lp[a..a + n]), wide(&rp[a..a + n]), wide(&v[b..b + m]))));
                a += n;
                b += m;
            }
        }
        let all = self.rl.gather_per_seq(mine, seqs.len())?;
        let (mut old, mut refs, mut values) = (Vec::new(), Vec::new(), Vec::new());
        for (o, r, v) in all {
            old.push(o);
            refs.push(r);
            values.push(v);
        }
        let processed = self.ppo.process(&old, &refs, &values, &scores);
        let orders = (0..self.ppo.ppo_epochs)
            .map(|e| {
                let mut o: Vec<usize> = (0..seqs.len()).collect();
                SplitMix64::new(self.rl.opts.seed ^ index.wrapping_mul(0x9E37_79B9) ^ (e as u64) << 40).shuffle(&mut o);
                o
            })
            .collect();
        let n = seqs.len() as f64;
        let kl_sum: f64 = processed.kl.iter().map(|k| k.iter().sum::<f64>()).sum::<f64>() / n;
        let non_score = -self.ppo.kl_coef * kl_sum;
        let mean_score = scores.iter().sum::<f64>() / n;
        let mut metrics = reward_metrics(&seqs, &self.rl.rewards.names());
        for (k, v) in [
            ("objective/kl", kl_sum),
            ("objective/entropy", old.iter().map(|l| -l.iter().sum::<f64>()).sum::<f64>() / n),
            ("objective/non_score_reward", non_score),
            ("objective/rlhf_reward", non_score + mean_score),
            ("objective/scores", mean_score),
            ("val/num_eos_tokens", seqs.iter().filter(|s| s.finished).count() as f64),
            ("gen_tokens_per_s", gen_tokens as f64 / gen_s.max(1e-9)),
            ("gen_seconds", gen_s),
        ] {
            metrics.insert(k.into(), json!(v));
        }
        metrics.extend(completion_metrics(&seqs));
        let adv: Vec<f64> =
            processed.advantages.iter().map(|a| a.iter().sum::<f64>() / a.len().max(1) as f64).collect();
        self.rl.log(step + 1, &seqs, &adv)?;
        Ok(Rollout { index, seqs, old_logps: old, values, processed, orders, metrics })
    }
}

impl Recipe for PpoRecipe<'_> {
    const EXAMPLES: &'static str = "completions";
    const DATA: &'static str = "prompts";

    fn name(&self) -> &'static str {
        "ppo"
    }

    fn examples(&self) -> (usize, usize) {
        (self.rl.train.len(), self.rl.eval.len())
    }

    fn steps_per_epoch(&self) -> u64 {
        self.rl.rollouts_per_epoch() * (self.ppo.ppo_epochs * self.ppo.num_mini_batches).max(1) as u64
    }

    fn eval_key(&self) -> &'static str {
        "reward"
    }

    fn step(&mut self, t: &Trainable, step: u64) -> Result<Step> {
        let model = &t.model;
        let mbs = self.ppo.num_mini_batches.max(1);
        let per_rollout = (self.ppo.ppo_epochs.max(1) * mbs) as u64;
        let (index, j) = (step / per_rollout, (step % per_rollout) as usize);
        if self.rollout.as_ref().map(|r| r.index) != Some(index) {
            let r = self.new_rollout(model, index, step)?;
            self.rollout = Some(r);
        }
        let r = self.rollout.as_ref().context("a rollout was just made")?;
        let (epoch, m) = (j / mbs, j % mbs);
        let size = r.seqs.len().div_ceil(mbs);
        let order = &r.orders[epoch % r.orders.len()];
        let chosen: Vec<usize> = order[(m * size).min(order.len())..((m + 1) * size).min(order.len())].to_vec();
        let sub: Vec<Seq> = chosen.iter().map(|&i| r.seqs[i].clone()).collect();
        let width = r.seqs.iter().map(|s| s.tokens.len()).max().unwrap_or(0);
        let micro = self.rl.micro_batches(&sub);
        let dev = &model.device;
        let flat = |v: &dyn Fn(usize) -> Vec<f64>, mb: &[usize]| -> candle_core::Result<Tensor> {
            let f: Vec<f32> = mb.iter().flat_map(|&k| v(chosen[k])).map(|x| x as f32).collect();
            Tensor::from_vec(f.clone(), f.len(), dev)
        };
        let (mut sum, mut loss, mut tokens, mut examples) = (GradSum::default(), 0.0, 0, 0);
        // The five loss statistics, then the entropy's sum and count.
        let mut stats = [0.0f64; 7];
        for (_, mb) in self.rl.world.share(&micro) {
            examples += mb.len();
            let batch = self.rl.batch_of(&sub, mb, dev)?;
            tokens += batch.tokens;
            let pos = value_positions(&self.rl, &sub, mb, width);
            let (logps, ent, vpred) = self.forward(model, &batch, &pos, true)?;
            let ent = ent.context("entropies were asked for")?;
            let old = flat(&|i| r.old_logps[i].clone(), mb)?;
            let adv = flat(&|i| r.processed.advantages[i].clone(), mb)?;
            let values = flat(&|i| r.values[i].clone(), mb)?;
            let returns = flat(&|i| r.processed.returns[i].clone(), mb)?;
            let (l, s) = self.ppo.loss(&logps, &old, &adv, &vpred, &values, &returns)?;
            let l = (l / micro.len() as f64)?;
            loss += l.to_scalar::<f32>()? as f64;
            for (a, b) in stats.iter_mut().zip(s) {
                *a += b / micro.len() as f64;
            }
            stats[5] += ent.sum_all()?.to_scalar::<f32>()? as f64;
            stats[6] += ent.dim(0)? as f64;
            sum.add(grads_of(&t.vars_named, &l.backward()?)?)?;
        }
        self.rl.world.sum_f64(&mut stats)?;
        let mut metrics = r.metrics.clone();
        for (k, v) in [
            ("loss/policy_avg", stats[0]),
            ("loss/value_avg", stats[1]),
            ("policy/clipfrac_avg", stats[2]),
            ("val/clipfrac_avg", stats[3]),
            ("policy/approxkl_avg", stats[4]),
            ("policy/entropy_avg", stats[5] / stats[6].max(1.0)),
        ] {
            metrics.insert(k.into(), json!(v));
        }
        let grads = sum.finish(t, "the mini-batch has no completion")?;
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

    /// The value head, which PEFT's adapter format has no place for.
    fn save_extra(&self, _model: &Model, dir: &Path) -> Result<()> {
        let t = std::collections::HashMap::from([(VALUE_HEAD.to_string(), self.value_head.as_tensor().clone())]);
        candle_core::safetensors::save(&t, dir.join(EXTRA_VARS))?;
        Ok(())
    }
}
