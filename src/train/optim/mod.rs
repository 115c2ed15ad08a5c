//! AdamW as torch.optim.AdamW computes it (decoupled weight decay, bias-corrected moments), with
//! its state exposed for checkpoints, and global gradient-norm clipping. On a GPU the update runs as
//! in-place kernels ([`gpu`], `adamw.cu`); the learning-rate [`schedule`] is beside it.

#[cfg(feature = "cuda")]
mod gpu;
pub mod schedule;

pub use schedule::{lr_at, Schedule};

use anyhow::Result;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// LoRA+: B matrices (and 1-D parameters, not decayed) at this multiple of the learning rate, as
    /// PEFT's `create_loraplus_optimizer` groups them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loraplus_lr_ratio: Option<f64>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        // transformers' TrainingArguments defaults (weight decay 0.0 there; PEFT users usually set it).
        AdamWConfig { lr: 2e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, loraplus_lr_ratio: None }
    }
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    pub step: u64,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    /// Each variable's parameter group: its multiple of the learning rate, and whether it decays.
    pub groups: Vec<Group>,
}

/// A variable's parameter group, as torch's optimizers hold per-group settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Group {
    pub lr_scale: f64,
    pub decay: bool,
}

impl AdamW {
    /// The optimizer over `vars`, named as `Model::lora_vars` names them (their names place them in
    /// LoRA+'s groups).
    pub fn new(cfg: AdamWConfig, vars: &[(String, Var)]) -> Result<Self> {
        let m = vars.iter().map(|(_, v)| v.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        let v = vars.iter().map(|(_, v)| v.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        let groups = vars.iter().map(|(n, v)| group_of(&cfg, n, v.rank())).collect();
        Ok(AdamW { cfg, step: 0, m, v, groups })
    }

    /// One update of every variable with its gradient, at learning rate `lr`.
    pub fn update(&mut self, vars: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        #[cfg(feature = "cuda")]
        if vars.first().is_some_and(|v| v.device().is_cuda()) {
            for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
                let Group { lr_scale, decay } = self.groups[i];
                let (lr, weight_decay) = (lr * lr_scale, if decay { c.weight_decay } else { 0.0 });
                let g = g.contiguous()?;
                self.m[i].inplace_op2(&g, &gpu::Ema { beta: c.beta1 as f32, square: false })?;
                self.v[i].inplace_op2(&g, &gpu::Ema { beta: c.beta2 as f32, square: true })?;
                let apply = gpu::Apply {
                    decay: (1.0 - lr * weight_decay) as f32,
                    step: (lr / bc1) as f32,
                    inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
                    eps: c.eps as f32,
                };
                var.as_tensor().inplace_op3(&self.m[i], &self.v[i], &apply)?;
            }
            return Ok(());
        }
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            let Group { lr_scale, decay } = self.groups[i];
            let (lr, weight_decay) = (lr * lr_scale, if decay { c.weight_decay } else { 0.0 });
            self.m[i] = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            self.v[i] = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let p = if weight_decay > 0.0 {
                (var.as_tensor() * (1.0 - lr * weight_decay))?
            } else {
                var.as_tensor().clone()
            };
            let denom = ((self.v[i].sqrt()? / bc2.sqrt())? + c.eps)?;
            let upd = (self.m[i].div(&denom)? * (lr / bc1))?;
            var.set(&(p - upd)?)?;
        }
        Ok(())
    }
}

/// A variable's group: matrices decayed, 1-D parameters (a trained router's bias) not, as
/// transformers' Trainer leaves biases; all at the learning rate but under LoRA+ (PEFT's
/// `create_loraplus_optimizer`), where B matrices and 1-D parameters go at the ratio's multiple.
fn group_of(cfg: &AdamWConfig, name: &str, rank: usize) -> Group {
    let decay = rank > 1;
    match cfg.loraplus_lr_ratio {
        Some(ratio) if name.contains("lora_B") || rank == 1 => Group { lr_scale: ratio, decay },
        _ => Group { lr_scale: 1.0, decay },
    }
}

/// Scales gradients so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut sq = 0.0f64;
    if grads.first().is_some_and(|g| !g.device().is_cpu()) {
        // One transfer instead of one per tensor.
        let sums = grads.iter().map(|g| g.sqr()?.sum_all()).collect::<candle_core::Result<Vec<_>>>()?;
        sq = Tensor::stack(&sums, 0)?.to_dtype(candle_core::DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    } else {
        for g in grads.iter() {
            sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let s = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * s)?;
        }
    }
    Ok(norm)
}
