//! AdamW as torch.optim.AdamW computes it (decoupled weight decay, bias-corrected moments), with
//! its state exposed for checkpoints, global gradient-norm clipping, and the learning-rate
//! schedule (linear warmup, then cosine or linear decay to zero).

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
}

impl Default for AdamWConfig {
    fn default() -> Self {
        // transformers' TrainingArguments defaults (weight decay 0.0 there; PEFT users usually set it).
        AdamWConfig { lr: 2e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    pub step: u64,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig, vars: &[Var]) -> Result<Self> {
        let m = vars.iter().map(|v| v.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        let v = vars.iter().map(|v| v.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(AdamW { cfg, step: 0, m, v })
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
                let g = g.contiguous()?;
                self.m[i].inplace_op2(&g, &gpu::Ema { beta: c.beta1 as f32, square: false })?;
                self.v[i].inplace_op2(&g, &gpu::Ema { beta: c.beta2 as f32, square: true })?;
                let apply = gpu::Apply {
                    decay: (1.0 - lr * c.weight_decay) as f32,
                    step: (lr / bc1) as f32,
                    inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
                    eps: c.eps as f32,
                };
                var.as_tensor().inplace_op3(&self.m[i], &self.v[i], &apply)?;
            }
            return Ok(());
        }
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            self.m[i] = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            self.v[i] = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let p = if c.weight_decay > 0.0 {
                (var.as_tensor() * (1.0 - lr * c.weight_decay))?
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

/// The update as in-place GPU kernels (src/train/kernels/adamw.cu).
#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{CpuStorage, CudaStorage, InplaceOp2, InplaceOp3, Layout};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/adamw.ptx"));

    fn f32_at<'a>(s: &'a CudaStorage, l: &Layout) -> candle_core::Result<(&'a CudaSlice<f32>, usize)> {
        match (&s.slice, l.contiguous_offsets()) {
            (CudaStorageSlice::F32(x), Some((start, _))) => Ok((x, start)),
            _ => candle_core::bail!("adamw: optimizer tensors must be contiguous f32"),
        }
    }

    fn launch(n: usize) -> LaunchConfig {
        LaunchConfig::for_num_elems(n as u32)
    }

    /// `m <- beta m + (1 - beta) g` (or `g^2` with `square`).
    pub struct Ema {
        pub beta: f32,
        pub square: bool,
    }

    impl InplaceOp2 for Ema {
        fn name(&self) -> &'static str {
            "adamw-ema"
        }
        fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle_core::Result<()> {
            candle_core::bail!("adamw-ema: GPU only; the CPU updates with tensor ops")
        }
        fn cuda_fwd(
            &self,
            dst: &mut CudaStorage,
            dl: &Layout,
            gst: &CudaStorage,
            gl: &Layout,
        ) -> candle_core::Result<()> {
            let n = dl.shape().elem_count();
            let (g, gs) = f32_at(gst, gl)?;
            let g = g.slice(gs..);
            let Some((ms, _)) = dl.contiguous_offsets() else { candle_core::bail!("adamw: state must be contiguous") };
            let dev = dst.device.clone();
            let CudaStorageSlice::F32(m) = &mut dst.slice else { candle_core::bail!("adamw: state must be f32") };
            let mut m = m.slice_mut(ms..);
            let f = dev.get_or_load_custom_func("ema", "tunekit_adamw", PTX)?;
            let (n32, sq) = (n as i32, self.square as i32);
            let mut b = f.builder();
            b.arg(&mut m);
            b.arg(&g);
            b.arg(&n32);
            b.arg(&self.beta);
            b.arg(&sq);
            // SAFETY: n elements of m and g, both f32 and contiguous.
            unsafe { b.launch(launch(n)) }.w()?;
            Ok(())
        }
    }

    /// `p <- p decay - step m / (sqrt(v) inv_sqrt_bc2 + eps)`.
    pub struct Apply {
        pub decay: f32,
        pub step: f32,
        pub inv_sqrt_bc2: f32,
        pub eps: f32,
    }

    impl InplaceOp3 for Apply {
        fn name(&self) -> &'static str {
            "adamw-apply"
        }
        fn cpu_fwd(
            &self,
            _: &mut CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<()> {
            candle_core::bail!("adamw-apply: GPU only; the CPU updates with tensor ops")
        }
        fn cuda_fwd(
            &self,
            dst: &mut CudaStorage,
            dl: &Layout,
            mst: &CudaStorage,
            ml: &Layout,
            vst: &CudaStorage,
            vl: &Layout,
        ) -> candle_core::Result<()> {
            let n = dl.shape().elem_count();
            let (m, mo) = f32_at(mst, ml)?;
            let (v, vo) = f32_at(vst, vl)?;
            let (m, v) = (m.slice(mo..), v.slice(vo..));
            let Some((ps, _)) = dl.contiguous_offsets() else {
                candle_core::bail!("adamw: weights must be contiguous")
            };
            let dev = dst.device.clone();
            let CudaStorageSlice::F32(p) = &mut dst.slice else { candle_core::bail!("adamw: weights must be f32") };
            let mut p = p.slice_mut(ps..);
            let f = dev.get_or_load_custom_func("adamw_apply", "tunekit_adamw", PTX)?;
            let n32 = n as i32;
            let mut b = f.builder();
            b.arg(&mut p);
            b.arg(&m);
            b.arg(&v);
            b.arg(&n32);
            b.arg(&self.decay);
            b.arg(&self.step);
            b.arg(&self.inv_sqrt_bc2);
            b.arg(&self.eps);
            // SAFETY: n elements of p, m and v, all f32 and contiguous.
            unsafe { b.launch(launch(n)) }.w()?;
            Ok(())
        }
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
}

/// Learning rate at optimizer step `step` (0-based) of `total`, as transformers' schedulers.
pub fn lr_at(base: f64, step: u64, warmup: u64, total: u64, sched: Schedule) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    match sched {
        Schedule::Constant => base,
        Schedule::Linear => base * (1.0 - progress).max(0.0),
        Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos()),
    }
}
