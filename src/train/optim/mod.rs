//! AdamW as torch.optim.AdamW computes it (decoupled weight decay, bias-corrected moments), with
//! its state exposed for checkpoints, and global gradient-norm clipping. The moments ([`moments`])
//! are f32 or, as bitsandbytes' AdamW8bit keeps them, 8-bit blockwise ([`blockwise8`]); on the CPU
//! each variable's update is one in-place pass, on a GPU in-place kernels ([`gpu`], `adamw.cu`).
//! The learning-rate [`schedule`] is beside it.

pub mod blockwise8;
#[cfg(feature = "cuda")]
mod gpu;
pub mod moments;
pub mod schedule;

pub use schedule::{lr_at, Schedule};

use anyhow::{bail, Context, Result};
use blockwise8::{Blockwise8, MIN_8BIT_SIZE};
use candle_core::{DType, Tensor, Var};
use moments::{CpuStep, Hyper, Moments};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Which AdamW keeps the moments: in f32 (torch's), or in 8 bits blockwise (bitsandbytes'
/// `AdamW8bit`; transformers' `optim="adamw_bnb_8bit"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
pub enum Optim {
    #[default]
    #[serde(rename = "adamw")]
    #[value(name = "adamw", alias = "adamw_torch")]
    AdamW,
    #[serde(rename = "adamw_8bit")]
    #[value(name = "adamw_8bit", alias = "adamw_bnb_8bit")]
    AdamW8bit,
}

impl Optim {
    /// Bytes of the two moments per parameter: 8 in f32; 2 and a 4-byte scale per 256 values in
    /// 8 bits (tensors too small for 8 bits aside).
    pub fn state_bytes_per_param(self) -> f64 {
        match self {
            Optim::AdamW => 8.0,
            Optim::AdamW8bit => 2.0 + 8.0 / blockwise8::BLOCK as f64,
        }
    }
}

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
    /// How the moments are kept.
    #[serde(default)]
    pub optim: Optim,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        // transformers' TrainingArguments defaults (weight decay 0.0 there; PEFT users usually set it).
        AdamWConfig {
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            loraplus_lr_ratio: None,
            optim: Optim::AdamW,
        }
    }
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    pub step: u64,
    /// Each variable's moments, in the variables' order.
    pub states: Vec<Moments>,
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
    /// The optimizer over `vars`, named as `Model::trained_vars` names them (their names place them
    /// in LoRA+'s groups). On the CPU the moments are f32 vectors, or 8-bit blockwise for tensors
    /// of at least `MIN_8BIT_SIZE` values under `adamw_8bit`; on a GPU f32 tensors.
    pub fn new(cfg: AdamWConfig, vars: &[(String, Var)]) -> Result<Self> {
        let mut states = Vec::with_capacity(vars.len());
        for (name, v) in vars {
            let n = v.elem_count();
            states.push(match (v.device().is_cpu() && v.dtype() == DType::F32, cfg.optim) {
                (false, Optim::AdamW8bit) => {
                    bail!("--optim adamw_8bit keeps its states on the CPU for now; {name} is on {:?}", v.device())
                }
                (false, Optim::AdamW) => Moments::Tensors { m: v.zeros_like()?, v: v.zeros_like()? },
                (true, Optim::AdamW8bit) if n >= MIN_8BIT_SIZE => {
                    Moments::Q8 { m: Blockwise8::zeros(n), v: Blockwise8::zeros(n) }
                }
                (true, _) => Moments::F32 { m: vec![0.0; n], v: vec![0.0; n] },
            });
        }
        let groups = vars.iter().map(|(n, v)| group_of(&cfg, n, v.rank())).collect();
        Ok(AdamW { cfg, step: 0, states, groups })
    }

    /// Bytes of every variable's moments.
    pub fn state_bytes(&self) -> usize {
        self.states.iter().map(Moments::bytes).sum()
    }

    /// One update of every variable with its gradient, at learning rate `lr`.
    pub fn update(&mut self, vars: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            let Group { lr_scale, decay } = self.groups[i];
            let (lr, weight_decay) = (lr * lr_scale, if decay { c.weight_decay } else { 0.0 });
            let g = g.contiguous()?;
            match &mut self.states[i] {
                #[cfg(feature = "cuda")]
                Moments::Tensors { m, v } if var.device().is_cuda() => {
                    m.inplace_op2(&g, &gpu::Ema { beta: c.beta1 as f32, square: false })?;
                    v.inplace_op2(&g, &gpu::Ema { beta: c.beta2 as f32, square: true })?;
                    let apply = gpu::Apply {
                        decay: (1.0 - lr * weight_decay) as f32,
                        step: (lr / bc1) as f32,
                        inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
                        eps: c.eps as f32,
                    };
                    var.as_tensor().inplace_op3(m, v, &apply)?;
                }
                Moments::Tensors { m, v } => {
                    *m = ((&*m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
                    *v = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
                    let p = (var.as_tensor() * (1.0 - lr * weight_decay))?;
                    let denom = ((v.sqrt()? / bc2.sqrt())? + c.eps)?;
                    var.set(&(p - (m.div(&denom)? * (lr / bc1))?)?)?;
                }
                state => {
                    let hyper = Hyper {
                        beta1: c.beta1 as f32,
                        beta2: c.beta2 as f32,
                        eps: c.eps as f32,
                        decay: (1.0 - lr * weight_decay) as f32,
                        step_size: (lr / bc1) as f32,
                        sqrt_bc2: bc2.sqrt() as f32,
                    };
                    var.as_tensor().inplace_op2(&g, &CpuStep { moments: std::sync::Mutex::new(state), hyper })?;
                }
            }
        }
        Ok(())
    }

    /// The moments as tensors for a checkpoint: `m.{i}` and `v.{i}` (f32), or for 8-bit states
    /// `m.{i}.codes` (u8) and `m.{i}.absmax` (f32), the same for v.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut t = HashMap::new();
        let cpu = &candle_core::Device::Cpu;
        for (i, s) in self.states.iter().enumerate() {
            match s {
                Moments::Tensors { m, v } => {
                    t.insert(format!("m.{i}"), m.clone());
                    t.insert(format!("v.{i}"), v.clone());
                }
                Moments::F32 { m, v } => {
                    t.insert(format!("m.{i}"), Tensor::from_slice(m, m.len(), cpu)?);
                    t.insert(format!("v.{i}"), Tensor::from_slice(v, v.len(), cpu)?);
                }
                Moments::Q8 { m, v } => {
                    for (k, q) in [("m", m), ("v", v)] {
                        t.insert(format!("{k}.{i}.codes"), Tensor::from_slice(&q.codes, q.codes.len(), cpu)?);
                        t.insert(format!("{k}.{i}.absmax"), Tensor::from_slice(&q.absmax, q.absmax.len(), cpu)?);
                    }
                }
            }
        }
        Ok(t)
    }

    /// Restores the moments from [`AdamW::state_tensors`]' form; the checkpoint must have been
    /// written with the same `--optim`.
    pub fn load_state_tensors(&mut self, t: &HashMap<String, Tensor>) -> Result<()> {
        let get = |k: &str| -> Result<&Tensor> {
            t.get(k).with_context(|| {
                format!("the checkpoint's optimizer state lacks {k}: resume with the --optim the run was started with")
            })
        };
        for (i, s) in self.states.iter_mut().enumerate() {
            match s {
                Moments::Tensors { m, v } => {
                    *m = get(&format!("m.{i}"))?.reshape(m.shape())?.to_device(m.device())?;
                    *v = get(&format!("v.{i}"))?.reshape(v.shape())?.to_device(v.device())?;
                }
                Moments::F32 { m, v } => {
                    *m = get(&format!("m.{i}"))?.flatten_all()?.to_vec1()?;
                    *v = get(&format!("v.{i}"))?.flatten_all()?.to_vec1()?;
                }
                Moments::Q8 { m, v } => {
                    for (k, q) in [("m", m), ("v", v)] {
                        q.codes = get(&format!("{k}.{i}.codes"))?.to_vec1()?;
                        q.absmax = get(&format!("{k}.{i}.absmax"))?.to_vec1()?;
                    }
                }
            }
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
