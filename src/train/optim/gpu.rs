//! The AdamW update as in-place GPU kernels (adamw.cu, PTX built by build.rs).

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
    fn cuda_fwd(&self, dst: &mut CudaStorage, dl: &Layout, gst: &CudaStorage, gl: &Layout) -> candle_core::Result<()> {
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
        let Some((ps, _)) = dl.contiguous_offsets() else { candle_core::bail!("adamw: weights must be contiguous") };
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
