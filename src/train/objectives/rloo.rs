//! REINFORCE leave-one-out as TRL's RLOOTrainer computes it (trl/trainer/rloo_trainer.py, TRL 1.16):
//! the KL to the reference is a penalty on each completion's reward, `r - beta * sum_t (log pi_old -
//! log ref)` (the first-order estimate, summed over its tokens); the advantage is that reward minus
//! the mean of the group's *other* completions' rewards (optionally normalised over the batch,
//! `(a - mean) / (std + 1e-4)`); the loss is PPO's clipped objective with one ratio per completion,
//! `exp(sum_t log pi - sum_t log pi_old)`, averaged over the completions.

use super::grpo::std_unbiased;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rloo {
    pub epsilon: f64,
    pub epsilon_high: f64,
    /// The KL penalty's coefficient in the reward (TRL's default 0.05); 0 skips the reference.
    pub beta: f64,
    /// Optimizer steps per rollout (the rollout's log-probabilities kept for the ratio).
    pub num_iterations: usize,
    /// Normalise the advantages over the rollout (TRL's `normalize_advantages`, off by default).
    pub normalize_advantages: bool,
}

/// The rewards with the KL penalty (`kl`: each completion's summed log-ratio to the reference) and
/// the leave-one-out advantages, for rewards laid out group after group of `group` (at least 2).
pub fn advantages(rewards: &[f64], kl: &[f64], beta: f64, group: usize, normalize: bool) -> (Vec<f64>, Vec<f64>) {
    let penalised: Vec<f64> = rewards.iter().zip(kl).map(|(r, k)| r - beta * k).collect();
    let mut adv = Vec::with_capacity(penalised.len());
    for g in penalised.chunks(group) {
        let sum: f64 = g.iter().sum();
        for &r in g {
            adv.push(match g.len() {
                1 => 0.0,
                n => r - (sum - r) / (n - 1) as f64,
            });
        }
    }
    if normalize {
        let mean = adv.iter().sum::<f64>() / adv.len().max(1) as f64;
        let std = std_unbiased(&adv);
        for a in &mut adv {
            *a = (*a - mean) / (std + 1e-4);
        }
    }
    (penalised, adv.into_iter().map(|a| if a.is_nan() { 0.0 } else { a }).collect())
}

/// What the loss reports: completions whose ratio was clipped below and above.
#[derive(Debug, Default, Clone, Copy)]
pub struct SeqStats {
    pub completions: f64,
    pub low_clipped: f64,
    pub high_clipped: f64,
}

impl Rloo {
    /// The micro-batch's share of the step's loss over `total` completions: `logps` [B] each
    /// completion's summed log-probability (differentiable), `old` [B] at sampling time,
    /// `advantages` [B].
    pub fn loss(
        &self,
        logps: &Tensor,
        old: &Tensor,
        advantages: &Tensor,
        total: usize,
    ) -> candle_core::Result<(Tensor, SeqStats)> {
        let ratio = (logps - old)?.exp()?;
        let clipped = ratio.clamp(1.0 - self.epsilon, 1.0 + self.epsilon_high)?;
        let per_seq = (&ratio * advantages)?.minimum(&(&clipped * advantages)?)?.neg()?;
        let mut stats = SeqStats { completions: logps.dim(0)? as f64, ..Default::default() };
        for (r, a) in ratio.to_vec1::<f32>()?.iter().zip(advantages.to_vec1::<f32>()?) {
            stats.low_clipped += ((*r as f64) < 1.0 - self.epsilon && a < 0.0) as u8 as f64;
            stats.high_clipped += ((*r as f64) > 1.0 + self.epsilon_high && a > 0.0) as u8 as f64;
        }
        Ok(((per_seq.sum_all()? / total.max(1) as f64)?, stats))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_baseline_leaves_each_completion_out_and_the_kl_is_a_reward_penalty() {
        let (r, a) = advantages(&[1.0, 0.0, 2.0, 3.0, 3.0, 0.0], &[0.0; 6], 0.05, 3, false);
        assert_eq!(r, vec![1.0, 0.0, 2.0, 3.0, 3.0, 0.0]);
        assert_eq!(a, vec![0.0, -1.5, 1.5, 1.5, 1.5, -3.0]);
        let (r, _) = advantages(&[1.0, 1.0], &[2.0, -2.0], 0.5, 2, false);
        assert_eq!(r, vec![0.0, 2.0]);
        let (_, a) = advantages(&[1.0, 0.0, 0.0, 1.0], &[0.0; 4], 0.0, 2, true);
        let mean = a.iter().sum::<f64>() / 4.0;
        assert!(mean.abs() < 1e-12 && (a[0] - 1.0 / (std_unbiased(&[1.0, -1.0, -1.0, 1.0]) + 1e-4)).abs() < 1e-9);
    }
}
