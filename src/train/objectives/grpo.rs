//! Group relative policy optimisation as TRL's GRPOTrainer computes it (trl/trainer/grpo_trainer.py,
//! `_generate_and_score_completions` and `_compute_loss`): advantages `r - mean(group)` divided by
//! `std + 1e-4` (the group's std, the batch's, or none; Bessel-corrected as `nanstd`), the clipped
//! ratio `min(r A, clip(r, 1 - eps, 1 + eps_high) A)` per completion token, plus `beta` times the k3
//! estimate of the KL to the reference (times the ratio, TRL's default bias correction), aggregated by
//! the loss type:
//! * `grpo`: each completion's token mean, averaged over completions;
//! * `dapo`: the token mean over the whole step (TRL's default);
//! * `bnpo`: the token mean of each micro-batch, averaged over micro-batches;
//! * `dr_grpo`: the token sum over completions x `max_new_tokens`.
//!
//! With one iteration per rollout the old log-probabilities are the current ones detached (the
//! ratio is 1, its gradient the policy gradient), as TRL does. GSPO (`importance_sampling_level`
//! "sequence"): each completion's ratio is `exp` of its tokens' mean log-ratio, shared by its tokens.
//! `mask_truncated_completions`: a completion cut at `max_new_tokens` keeps its reward in the
//! advantages but leaves the loss (its tokens weigh 0 and count in no token total).

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum GrpoLoss {
    Grpo,
    Dapo,
    #[value(name = "dr_grpo")]
    DrGrpo,
    Bnpo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ScaleRewards {
    /// Divide by each group's standard deviation.
    Group,
    /// Divide by the batch's standard deviation.
    Batch,
    /// No scaling (Dr. GRPO).
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Grpo {
    pub epsilon: f64,
    pub epsilon_high: f64,
    /// KL coefficient to the reference (the base with the adapter off); 0 skips the reference.
    pub beta: f64,
    pub loss: GrpoLoss,
    pub scale_rewards: ScaleRewards,
    /// Optimizer steps per rollout (TRL's μ); after the first, the stored old log-probabilities.
    pub num_iterations: usize,
    /// Multiply the KL term by the ratio, so that its gradient is the unbiased reverse-KL gradient
    /// (TRL's `use_bias_correction_kl`, on by default there too).
    #[serde(default = "yes")]
    pub kl_bias_correction: bool,
    /// GSPO: one importance ratio per completion (TRL's `importance_sampling_level="sequence"`).
    #[serde(default)]
    pub sequence_level: bool,
    /// Truncated completions out of the loss (TRL's `mask_truncated_completions`).
    #[serde(default)]
    pub mask_truncated: bool,
}

fn yes() -> bool {
    true
}

/// `nanstd` of TRL: the Bessel-corrected standard deviation (NaN for fewer than two values).
pub fn std_unbiased(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return f64::NAN;
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
    (var * v.len() as f64 / (v.len() - 1) as f64).sqrt()
}

/// Advantages of rewards laid out group after group (`group` completions of each prompt), and for
/// each completion whether its scale was zero (TRL's `frac_reward_zero_std`).
pub fn advantages(rewards: &[f64], group: usize, scale: ScaleRewards) -> (Vec<f64>, Vec<bool>) {
    let batch_std = std_unbiased(rewards);
    let mut adv = Vec::with_capacity(rewards.len());
    let mut zero = Vec::with_capacity(rewards.len());
    for g in rewards.chunks(group) {
        let mean = g.iter().sum::<f64>() / g.len() as f64;
        let std = match scale {
            ScaleRewards::Group | ScaleRewards::None if g.len() > 1 => std_unbiased(g),
            ScaleRewards::Group | ScaleRewards::None => 0.0,
            ScaleRewards::Batch if rewards.len() > 1 => batch_std,
            ScaleRewards::Batch => 0.0,
        };
        for &r in g {
            let a = r - mean;
            let a = if scale == ScaleRewards::None { a } else { a / (std + 1e-4) };
            adv.push(if a.is_nan() { 0.0 } else { a });
            zero.push(std.abs() <= 1e-8);
        }
    }
    (adv, zero)
}

/// The per-token inputs of the loss over a micro-batch's completion tokens, flattened.
pub struct TokenBatch<'a> {
    /// log p(token) under the policy at the sampling temperature [N], differentiable.
    pub logps: &'a Tensor,
    /// At sampling time [N]; None when this is the rollout's first iteration (then `logps` detached).
    pub old_logps: Option<&'a Tensor>,
    /// Under the reference [N], when beta > 0.
    pub ref_logps: Option<&'a Tensor>,
    /// Each token's completion's advantage [N].
    pub advantages: &'a Tensor,
    /// Each token's share of the step's loss [N] (the loss type's aggregation).
    pub weights: &'a Tensor,
    /// The completions' token counts in order (they tile the N tokens), for sequence-level ratios.
    pub lengths: &'a [usize],
}

/// What the loss reports besides itself (TRL's metrics), as sums over the micro-batch's tokens.
#[derive(Debug, Default, Clone, Copy)]
pub struct TokenStats {
    pub tokens: f64,
    pub kl: f64,
    pub low_clipped: f64,
    pub high_clipped: f64,
}

impl Grpo {
    /// The micro-batch's share of the step's loss, differentiable in the policy, and its stats.
    pub fn loss(&self, b: &TokenBatch) -> candle_core::Result<(Tensor, TokenStats)> {
        let old = match b.old_logps {
            Some(o) => o.clone(),
            None => b.logps.detach(),
        };
        let mut log_ratio = (b.logps - &old)?;
        if self.sequence_level {
            // GSPO: each completion's mean log-ratio, for every one of its tokens.
            let mut parts = Vec::with_capacity(b.lengths.len());
            let mut at = 0;
            for &l in b.lengths.iter().filter(|&&l| l > 0) {
                parts.push(log_ratio.narrow(0, at, l)?.mean_keepdim(0)?.broadcast_as(l)?);
                at += l;
            }
            log_ratio = Tensor::cat(&parts, 0)?;
        }
        let ratio = log_ratio.exp()?;
        let clipped = ratio.clamp(1.0 - self.epsilon, 1.0 + self.epsilon_high)?;
        let l1 = (&ratio * b.advantages)?;
        let l2 = (&clipped * b.advantages)?;
        let mut per_token = l1.minimum(&l2)?.neg()?;
        let n = b.logps.dim(0)? as f64;
        let mut stats = TokenStats { tokens: n, ..Default::default() };
        if self.beta != 0.0 {
            let r = b.ref_logps.ok_or_else(|| candle_core::Error::Msg("beta > 0 needs reference log-probs".into()))?;
            let d = (r - b.logps)?;
            let mut kl = ((d.exp()? - &d)? - 1.0)?;
            if self.kl_bias_correction {
                kl = (kl * &ratio)?;
            }
            stats.kl = kl.sum_all()?.to_scalar::<f32>()? as f64;
            per_token = (per_token + (kl * self.beta)?)?;
        }
        let (r, a) = (ratio.to_vec1::<f32>()?, b.advantages.to_vec1::<f32>()?);
        for (r, a) in r.iter().zip(&a) {
            stats.low_clipped += ((*r as f64) < 1.0 - self.epsilon && *a < 0.0) as u8 as f64;
            stats.high_clipped += ((*r as f64) > 1.0 + self.epsilon_high && *a > 0.0) as u8 as f64;
        }
        Ok(((per_token * b.weights)?.sum_all()?, stats))
    }

    /// Each completion token's weight in the step's loss, for completions of `lengths` tokens split
    /// into `micro` (lists of completion indices) as the loss type aggregates them; completions
    /// `masked` (truncated, with `mask_truncated`) weigh 0 and count in no token total, as TRL's
    /// completion mask leaves them out (a `grpo` mean over completions still counts them).
    pub fn token_weights(
        &self,
        lengths: &[usize],
        masked: &[bool],
        micro: &[Vec<usize>],
        max_new_tokens: usize,
    ) -> Vec<Vec<f32>> {
        let n_seq = lengths.len() as f64;
        let kept = |i: usize| if masked.get(i).copied().unwrap_or(false) { 0 } else { lengths[i] };
        let total: usize = (0..lengths.len()).map(kept).sum();
        micro
            .iter()
            .map(|mb| {
                let mb_tokens: usize = mb.iter().map(|&i| kept(i)).sum();
                mb.iter()
                    .flat_map(|&i| {
                        let w = match self.loss {
                            _ if kept(i) == 0 => 0.0,
                            GrpoLoss::Grpo => 1.0 / (lengths[i].max(1) as f64 * n_seq),
                            GrpoLoss::Dapo => 1.0 / total.max(1) as f64,
                            GrpoLoss::Bnpo => 1.0 / (mb_tokens.max(1) as f64 * micro.len() as f64),
                            GrpoLoss::DrGrpo => 1.0 / (n_seq * max_new_tokens as f64),
                        };
                        std::iter::repeat_n(w as f32, lengths[i])
                    })
                    .collect()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advantages_are_group_relative_and_scaled_as_trl_scales_them() {
        let r = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0];
        let (a, zero) = advantages(&r, 3, ScaleRewards::Group);
        let std = std_unbiased(&[1.0, 0.0, 0.0]);
        assert!((a[0] - (1.0 - 1.0 / 3.0) / (std + 1e-4)).abs() < 1e-12);
        assert_eq!(zero, vec![false, false, false, false, false, false]);
        let (a, zero) = advantages(&[1.0, 1.0, 3.0, 5.0], 2, ScaleRewards::None);
        assert_eq!(a, vec![0.0, 0.0, -1.0, 1.0]);
        assert_eq!(zero, vec![true, true, false, false]);
        let (a, _) = advantages(&[0.0, 2.0], 2, ScaleRewards::Batch);
        assert!((a[1] - 1.0 / (std_unbiased(&[0.0, 2.0]) + 1e-4)).abs() < 1e-12);
    }

    #[test]
    fn token_weights_follow_the_loss_type() {
        let g = |loss| Grpo {
            epsilon: 0.2,
            epsilon_high: 0.2,
            beta: 0.0,
            loss,
            scale_rewards: ScaleRewards::Group,
            num_iterations: 1,
            kl_bias_correction: true,
            sequence_level: false,
            mask_truncated: false,
        };
        let (lengths, micro, none) = (vec![2, 4], vec![vec![0], vec![1]], vec![false, false]);
        let w = |loss, masked: &[bool]| g(loss).token_weights(&lengths, masked, &micro, 8);
        assert_eq!(w(GrpoLoss::Grpo, &none), vec![vec![0.25; 2], vec![0.125; 4]]);
        assert_eq!(w(GrpoLoss::Dapo, &none), vec![vec![1.0 / 6.0; 2], vec![1.0 / 6.0; 4]]);
        assert_eq!(w(GrpoLoss::Bnpo, &none), vec![vec![0.25; 2], vec![0.125; 4]]);
        assert_eq!(w(GrpoLoss::DrGrpo, &none), vec![vec![1.0 / 16.0; 2], vec![1.0 / 16.0; 4]]);
        // The second completion truncated and masked: no weight, and out of dapo's token total.
        let second = [false, true];
        assert_eq!(w(GrpoLoss::Grpo, &second), vec![vec![0.25; 2], vec![0.0; 4]]);
        assert_eq!(w(GrpoLoss::Dapo, &second), vec![vec![0.5; 2], vec![0.0; 4]]);
    }
}
