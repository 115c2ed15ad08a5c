//! PPO for RLHF as TRL's PPOTrainer computes it (trl/experimental/ppo/ppo_trainer.py, `train`): a
//! per-token reward of `-kl_coef * KL` (k1 `-(ref - logp)` or k3) with the reward model's score added
//! one past the completion's last token (at it when that is the end), optionally whitened; GAE
//! advantages (`gamma`, `lam`) whitened over the completion tokens, returns = advantages + values;
//! the clipped policy loss and the clipped value loss, `pg + vf_coef * vf`.
//!
//! TRL works on padded [batch, response length] arrays; here each completion's own tokens are laid
//! out back to back, which gives the same sums and means (the padded entries are masked out of
//! them), with `L` the batch's longest completion deciding where a score lands, as in TRL.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    /// `logp - ref` (unbiased, TRL's default).
    K1,
    /// `exp(ref - logp) - 1 - (ref - logp)` (lower variance).
    K3,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Ppo {
    pub kl_coef: f64,
    pub kl_estimator: KlEstimator,
    pub gamma: f64,
    pub lam: f64,
    pub cliprange: f64,
    pub cliprange_value: f64,
    pub vf_coef: f64,
    /// Passes over each rollout.
    pub ppo_epochs: usize,
    /// Optimizer steps per pass (the rollout split into this many mini-batches).
    pub num_mini_batches: usize,
    /// Subtracted from the score of a completion without an end-of-turn token.
    pub missing_eos_penalty: Option<f64>,
    pub whiten_rewards: bool,
}

/// TRL's `masked_mean` over all entries (the mask is implied: only real entries are passed).
fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// TRL's `masked_whiten`: `(v - mean) / sqrt(unbiased var + 1e-8)`, the mean added back unless
/// `shift_mean`.
fn whiten(v: &mut [Vec<f64>], shift_mean: bool) {
    let flat: Vec<f64> = v.iter().flatten().copied().collect();
    let m = mean(&flat);
    let n = flat.len() as f64;
    let var = flat.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n * (n / (n - 1.0));
    let r = 1.0 / (var + 1e-8).sqrt();
    for x in v.iter_mut().flatten() {
        *x = (*x - m) * r + if shift_mean { 0.0 } else { m };
    }
}

/// A rollout as PPO learns from it: per completion (its tokens `0..=sl`), the per-token rewards,
/// KL, advantages and returns; values and returns also at `sl + 1` when the batch has that column.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Processed {
    /// Per-token rewards (KL penalty and score), on the value positions (`sl + 2` or `L` entries).
    pub rewards: Vec<Vec<f64>>,
    /// Per-token KL estimate on the completion tokens.
    pub kl: Vec<Vec<f64>>,
    /// Whitened advantages on the completion tokens.
    pub advantages: Vec<Vec<f64>>,
    /// Returns on the value positions.
    pub returns: Vec<Vec<f64>>,
}

impl Ppo {
    /// From a rollout's log-probabilities under the policy and the reference (one per completion
    /// token), the values (one per value position: the completion's tokens and the one after the
    /// last when it fits the batch's longest completion `width`) and the scores.
    pub fn process(
        &self,
        logps: &[Vec<f64>],
        ref_logps: &[Vec<f64>],
        values: &[Vec<f64>],
        scores: &[f64],
    ) -> Processed {
        let width = logps.iter().map(Vec::len).max().unwrap_or(0);
        let mut kl = Vec::with_capacity(logps.len());
        let mut rewards = Vec::with_capacity(logps.len());
        for (b, (lp, rp)) in logps.iter().zip(ref_logps).enumerate() {
            let k: Vec<f64> = lp
                .iter()
                .zip(rp)
                .map(|(l, r)| {
                    let logr = r - l;
                    match self.kl_estimator {
                        KlEstimator::K1 => -logr,
                        KlEstimator::K3 => logr.exp() - 1.0 - logr,
                    }
                })
                .collect();
            // Value positions: the tokens, and sl + 1 when it exists; the reward there is 0 + score.
            let mut r: Vec<f64> = k.iter().map(|x| -self.kl_coef * x).collect();
            let sl = lp.len() - 1;
            if sl + 1 < width {
                r.push(0.0);
            }
            let end = if sl + 1 < width { sl + 1 } else { sl };
            r[end] += scores[b];
            debug_assert_eq!(r.len(), values[b].len());
            kl.push(k);
            rewards.push(r);
        }
        if self.whiten_rewards {
            whiten(&mut rewards, false);
        }
        let mut advantages = Vec::with_capacity(rewards.len());
        let mut returns = Vec::with_capacity(rewards.len());
        for (r, v) in rewards.iter().zip(values) {
            // GAE backwards over the row; positions past the value positions have value 0 and reward 0.
            let mut adv = vec![0.0; r.len()];
            let mut last = 0.0;
            for t in (0..r.len()).rev() {
                let next = v.get(t + 1).copied().unwrap_or(0.0);
                let delta = r[t] + self.gamma * next - v[t];
                last = delta + self.gamma * self.lam * last;
                adv[t] = last;
            }
            returns.push(adv.iter().zip(v).map(|(a, v)| a + v).collect());
            advantages.push(adv);
        }
        // Advantages live on the completion tokens only.
        for (a, lp) in advantages.iter_mut().zip(logps) {
            a.truncate(lp.len());
        }
        whiten(&mut advantages, true);
        Processed { rewards, kl, advantages, returns }
    }

    /// A micro-batch's loss, `pg + vf_coef * vf`, differentiable in the policy and the value head;
    /// tokens laid out completion by completion: `logps`, `old_logps`, `advantages` over completion
    /// tokens [N], `vpred`, `values`, `returns` over value positions [M]. Also (pg, vf, pg clip
    /// fraction, vf clip fraction, approx KL).
    pub fn loss(
        &self,
        logps: &Tensor,
        old_logps: &Tensor,
        advantages: &Tensor,
        vpred: &Tensor,
        values: &Tensor,
        returns: &Tensor,
    ) -> candle_core::Result<(Tensor, [f64; 5])> {
        let vclipped = vpred.clamp(&(values - self.cliprange_value)?, &(values + self.cliprange_value)?)?;
        let vf1 = (vpred - returns)?.sqr()?;
        let vf2 = (&vclipped - returns)?.sqr()?;
        let vf = (vf1.maximum(&vf2)?.mean_all()? * 0.5)?;
        let diff = (logps - old_logps)?;
        let ratio = diff.exp()?;
        let pg1 = (advantages.neg()? * &ratio)?;
        let pg2 = (advantages.neg()? * ratio.clamp(1.0 - self.cliprange, 1.0 + self.cliprange)?)?;
        let pg = pg1.maximum(&pg2)?.mean_all()?;
        let frac = |a: &Tensor, b: &Tensor| -> candle_core::Result<f64> {
            Ok(a.gt(b)?.to_dtype(candle_core::DType::F32)?.mean_all()?.to_scalar::<f32>()? as f64)
        };
        let stats = [
            pg.to_scalar::<f32>()? as f64,
            vf.to_scalar::<f32>()? as f64,
            frac(&pg2, &pg1)?,
            frac(&vf2, &vf1)?,
            (diff.sqr()?.mean_all()? * 0.5)?.to_scalar::<f32>()? as f64,
        ];
        Ok(((pg + (vf * self.vf_coef)?)?, stats))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ppo() -> Ppo {
        Ppo {
            kl_coef: 0.1,
            kl_estimator: KlEstimator::K1,
            gamma: 1.0,
            lam: 0.95,
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
            ppo_epochs: 1,
            num_mini_batches: 1,
            missing_eos_penalty: None,
            whiten_rewards: false,
        }
    }

    #[test]
    fn the_score_lands_one_past_the_last_token_unless_that_is_the_end() {
        // Two completions: 2 tokens (sl = 1) and 3 tokens (sl = 2, the batch's longest).
        let logps = vec![vec![-1.0, -2.0], vec![-1.0, -1.0, -1.0]];
        let refs = vec![vec![-1.5, -2.0], vec![-1.0, -1.0, -1.0]];
        let values = vec![vec![0.1, 0.2, 0.3], vec![0.0, 0.0, 0.0]];
        let p = ppo().process(&logps, &refs, &values, &[1.0, 2.0]);
        assert_eq!(p.rewards[0].len(), 3, "sl + 1 fits the width of 3");
        assert!((p.rewards[0][0] - (-0.1 * 0.5)).abs() < 1e-12, "k1 KL = logp - ref");
        assert_eq!(p.rewards[0][2], 1.0);
        assert_eq!(p.rewards[1], vec![0.0, 0.0, 2.0], "at the last token when it is the end");
        assert_eq!(p.advantages[0].len(), 2);
        let all: Vec<f64> = p.advantages.iter().flatten().copied().collect();
        assert!(mean(&all).abs() < 1e-9, "whitened");
    }
}
