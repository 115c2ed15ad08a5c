//! The causal softmax of attention scores [H, L, L] (one packed segment): positions after the query
//! get probability 0. [`CausalAttentionProbs`] computes `softmax(scale * q k^T)` as one op so the
//! scores are freed at once; [`CausalSoftmaxGrad`] is its backward. Rows in parallel on the CPU in
//! f32; on a GPU tunekit's own kernels (`softmax.cu`, PTX built by build.rs), f32 or bf16.

use crate::train::graph::contiguous_f32;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, D};

/// Causal softmax of scaled attention scores [H, L, L] in one pass (positions after the query get
/// probability 0), with its backward `dS = scale * P * (dP - sum(P * dP))`.
pub struct CausalSoftmax {
    pub scale: f32,
}

/// Rows of [.., L, L] scores to causal softmax probabilities, in place (row r is query r % L).
fn causal_softmax_rows(x: &mut [f32], len: usize, scale: f32) {
    use rayon::prelude::*;
    x.par_chunks_mut(len).enumerate().for_each(|(r, row)| {
        let i = r % len; // query position inside the segment
        let m = row[..=i].iter().cloned().fold(f32::NEG_INFINITY, f32::max) * scale;
        let mut sum = 0f32;
        for v in row[..=i].iter_mut() {
            *v = (*v * scale - m).exp();
            sum += *v;
        }
        let inv = 1.0 / sum;
        row[..=i].iter_mut().for_each(|v| *v *= inv);
        row[i + 1..].iter_mut().for_each(|v| *v = 0.0);
    });
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let len = l.shape().dims()[l.shape().rank() - 1];
        let mut out = contiguous_f32(s, l, "causal-softmax")?.to_vec();
        causal_softmax_rows(&mut out, len, self.scale);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        gpu::causal_softmax(s, l, self.scale)
    }

    fn bwd(&self, _x: &Tensor, p: &Tensor, dp: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(p.apply_op2_no_bwd(&dp.contiguous()?, &CausalSoftmaxGrad { scale: self.scale })?))
    }
}

/// The causal softmax's backward, `dS = scale * P * (dP - sum(P * dP))`: (P, dP) -> dS.
pub struct CausalSoftmaxGrad {
    pub scale: f32,
}

impl candle_core::CustomOp2 for CausalSoftmaxGrad {
    fn name(&self) -> &'static str {
        "causal-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        p: &CpuStorage,
        pl: &Layout,
        dp: &CpuStorage,
        dl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let len = pl.shape().dims()[pl.shape().rank() - 1];
        let pv = contiguous_f32(p, pl, "causal-softmax-grad")?;
        let gv = contiguous_f32(dp, dl, "causal-softmax-grad")?;
        let mut d = vec![0f32; pv.len()];
        d.par_chunks_mut(len).zip(pv.par_chunks(len).zip(gv.par_chunks(len))).enumerate().for_each(
            |(r, (drow, (prow, grow)))| {
                let i = r % len;
                let dot = crate::train::cpu::reduce::dot(&prow[..=i], &grow[..=i]);
                for j in 0..=i {
                    drow[j] = self.scale * prow[j] * (grow[j] - dot);
                }
            },
        );
        Ok((CpuStorage::F32(d), pl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        p: &candle_core::CudaStorage,
        pl: &Layout,
        dp: &candle_core::CudaStorage,
        dl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        gpu::causal_softmax_grad(p, pl, dp, dl, self.scale)
    }
}

/// `P = causal_softmax(scale * q k^T)` for q, k [H, L, hd] as one op, so that the [H, L, L] scores
/// are freed at once instead of being kept for the backward (only q, k and P are).
pub struct CausalAttentionProbs {
    pub scale: f32,
}

impl candle_core::CustomOp2 for CausalAttentionProbs {
    fn name(&self) -> &'static str {
        "causal-attention-probs"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (h, l, d) = ql.shape().dims3()?;
        let CpuStorage::F32(mut scores) = q.matmul(k, (h, l, l, d), ql, &kl.transpose(1, 2)?)? else {
            candle_core::bail!("causal-attention-probs: f32 only on the CPU")
        };
        causal_softmax_rows(&mut scores, l, self.scale);
        Ok((CpuStorage::F32(scores), Shape::from((h, l, l))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (h, l, d) = ql.shape().dims3()?;
        let scores = q.matmul(k, (h, l, l, d), ql, &kl.transpose(1, 2)?)?;
        gpu::causal_softmax(&scores, &Layout::contiguous((h, l, l)), self.scale)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        p: &Tensor,
        dp: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let ds = p.apply_op2_no_bwd(&dp.contiguous()?, &CausalSoftmaxGrad { scale: self.scale })?;
        Ok((Some(ds.matmul(k)?), Some(ds.t()?.matmul(q)?)))
    }
}

/// Launches tunekit's own kernels (softmax.cu, PTX built by build.rs).
#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, Layout, Shape};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/softmax.ptx"));

    fn rows_len(l: &Layout, what: &str) -> candle_core::Result<(usize, usize, usize)> {
        let Some((start, _)) = l.contiguous_offsets() else { candle_core::bail!("{what}: input must be contiguous") };
        let len = *l.dims().last().unwrap_or(&0);
        Ok((start, l.shape().elem_count() / len.max(1), len))
    }

    fn config(rows: usize, len: usize) -> LaunchConfig {
        let threads = len.div_ceil(32).clamp(1, 32) as u32 * 32;
        LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads.min(1024), 1, 1), shared_mem_bytes: 0 }
    }

    /// Runs kernel `name` with `inputs`, a fresh [rows, len] output, len and scale; one block per row.
    fn launch<T: DeviceRepr>(
        dev: &CudaDevice,
        name: &str,
        inputs: &[CudaView<'_, T>],
        rows: usize,
        len: usize,
        scale: f32,
    ) -> candle_core::Result<CudaSlice<T>> {
        let f = dev.get_or_load_custom_func(name, "tunekit_attention", PTX)?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<T>(rows * len)? };
        let mut b = f.builder();
        for v in inputs {
            b.arg(v);
        }
        let l = len as i32;
        b.arg(&out);
        b.arg(&l);
        b.arg(&scale);
        // SAFETY: the kernel reads rows*len elements of each input and writes as many of out.
        unsafe { b.launch(config(rows, len)) }.w()?;
        Ok(out)
    }

    pub fn causal_softmax(s: &CudaStorage, l: &Layout, scale: f32) -> candle_core::Result<(CudaStorage, Shape)> {
        let (start, rows, len) = rows_len(l, "causal-softmax")?;
        let dev = s.device();
        let slice = match &s.slice {
            CudaStorageSlice::F32(x) => {
                CudaStorageSlice::F32(launch(dev, "causal_softmax_fwd_f32", &[x.slice(start..)], rows, len, scale)?)
            }
            CudaStorageSlice::BF16(x) => {
                CudaStorageSlice::BF16(launch(dev, "causal_softmax_fwd_bf16", &[x.slice(start..)], rows, len, scale)?)
            }
            _ => candle_core::bail!("causal-softmax: f32 or bf16 scores only"),
        };
        Ok((CudaStorage { slice, device: dev.clone() }, l.shape().clone()))
    }

    pub fn causal_softmax_grad(
        p: &CudaStorage,
        pl: &Layout,
        dp: &CudaStorage,
        dl: &Layout,
        scale: f32,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (ps, rows, len) = rows_len(pl, "causal-softmax-grad")?;
        let (ds, _, _) = rows_len(dl, "causal-softmax-grad")?;
        let dev = p.device();
        let slice = match (&p.slice, &dp.slice) {
            (CudaStorageSlice::F32(a), CudaStorageSlice::F32(g)) => {
                let inputs = [a.slice(ps..), g.slice(ds..)];
                CudaStorageSlice::F32(launch(dev, "causal_softmax_bwd_f32", &inputs, rows, len, scale)?)
            }
            (CudaStorageSlice::BF16(a), CudaStorageSlice::BF16(g)) => {
                let inputs = [a.slice(ps..), g.slice(ds..)];
                CudaStorageSlice::BF16(launch(dev, "causal_softmax_bwd_bf16", &inputs, rows, len, scale)?)
            }
            _ => candle_core::bail!("causal-softmax-grad: P and dP must both be f32 or both bf16"),
        };
        Ok((CudaStorage { slice, device: dev.clone() }, pl.shape().clone()))
    }
}

/// `softmax(scale * scores + causal mask)` over the last dim of [H, L, L].
pub fn causal_softmax(scores: &Tensor, scale: f64, masks: &mut MaskCache) -> candle_core::Result<Tensor> {
    if (scores.device().is_cpu() && scores.dtype() == DType::F32) || scores.device().is_cuda() {
        return scores.contiguous()?.apply_op1(CausalSoftmax { scale: scale as f32 });
    }
    // In f32 whatever the compute dtype, as transformers' eager attention does.
    let len = scores.dim(D::Minus1)?;
    let s = (scores.to_dtype(DType::F32)? * scale)?.broadcast_add(&masks.get(len, scores.device())?)?;
    candle_nn::ops::softmax(&s, D::Minus1)?.to_dtype(scores.dtype())
}

/// Causal masks by length (0 on and below the diagonal, -inf above), built once.
#[derive(Default)]
pub struct MaskCache(std::collections::HashMap<usize, Tensor>);

impl MaskCache {
    pub fn get(&mut self, len: usize, device: &candle_core::Device) -> candle_core::Result<Tensor> {
        if let Some(m) = self.0.get(&len) {
            return Ok(m.clone());
        }
        let data: Vec<f32> = (0..len * len).map(|i| if i % len > i / len { f32::NEG_INFINITY } else { 0.0 }).collect();
        let m = Tensor::from_vec(data, (len, len), device)?;
        self.0.insert(len, m.clone());
        Ok(m)
    }
}
