//! Differentiable building blocks that candle lacks or does wastefully: a frozen-weight matmul
//! whose backward returns only the input gradient, RMSNorm and rotary embeddings from basic ops
//! (candle's fused versions have no backward), and causal attention per packed segment.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor, D};

/// `y = x @ w^T` for a frozen `w` [out, in]. Forward uses candle's GEMM; backward computes
/// `dx = dy @ w` and never the weight gradient (candle's matmul backward computes both).
pub struct FrozenMatmul {
    pub w: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let (ws, wl) = self.w.storage_and_layout();
        let Storage::Cpu(w) = &*ws else { candle_core::bail!("frozen-matmul: weight is not on the CPU") };
        let (n, k2) = wl.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("frozen-matmul: input has {k} features, weight expects {k2}");
        }
        let out = x.matmul(w, (1, m, n, k), xl, &wl.transpose(0, 1)?)?;
        Ok((out, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let (ws, wl) = self.w.storage_and_layout();
        let Storage::Cuda(w) = &*ws else { candle_core::bail!("frozen-matmul: weight is not on the GPU") };
        let (n, _) = wl.shape().dims2()?;
        let out = x.matmul(w, (1, m, n, k), xl, &wl.transpose(0, 1)?)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(dy.matmul(&self.w)?))
    }
}

/// `x` [tokens, in] times a frozen `w` [out, in], as a differentiable op in `x` only.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(FrozenMatmul { w: w.clone() })
}

/// RMSNorm from basic ops: `x / sqrt(mean(x^2) + eps) * w`, in f32.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    rms_norm_basic(x, w, eps)
}

/// RMSNorm with a frozen weight as the fused CPU op (f32 on the CPU only; `fused::rms_norm` picks).
pub fn rms_norm_frozen_cpu(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let wv = w.flatten_all()?.to_vec1::<f32>()?;
    x.contiguous()?.apply_op1(RmsNormOp { w: wv, eps: eps as f32 })
}

/// As transformers' LlamaRMSNorm: normalise in f32, cast back to the compute dtype, then scale.
fn rms_norm_basic(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let x32 = x.to_dtype(DType::F32)?;
    let ms = x32.sqr()?.mean_keepdim(D::Minus1)?;
    x32.broadcast_div(&(ms + eps)?.sqrt()?)?.to_dtype(x.dtype())?.broadcast_mul(w)
}

/// Rotary embedding, Hugging Face layout: `x * cos + rotate_half(x) * sin`, with cos/sin already
/// gathered by position ([tokens, head_dim]); `x` is [tokens, heads, head_dim].
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let (cos, sin) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// Causal attention inside each packed segment (block-diagonal: segments never see each other).
/// q [T, Hq, hd], k/v [T, Hkv, hd]; returns [T, Hq*hd].
pub fn segment_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seq_lengths: &[usize],
    masks: &mut MaskCache,
) -> candle_core::Result<Tensor> {
    let (_, hq, hd) = q.dims3()?;
    let hkv = k.dim(1)?;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut outs = Vec::with_capacity(seq_lengths.len());
    let mut start = 0;
    for &len in seq_lengths {
        let qs = segment_heads(q, start, len, 1)?;
        let ks = segment_heads(k, start, len, hq / hkv)?;
        let vs = segment_heads(v, start, len, hq / hkv)?;
        let probs = if qs.device().is_cuda() || qs.dtype() == DType::F32 {
            qs.apply_op2(&ks, CausalAttentionProbs { scale: scale as f32 })?
        } else {
            causal_softmax(&qs.matmul(&ks.t()?)?, scale, masks)?
        };
        let o = probs.matmul(&vs)?; // [Hq, L, hd]
        outs.push(o.transpose(0, 1)?.reshape((len, hq * hd))?);
        start += len;
    }
    Tensor::cat(&outs, 0)
}

/// Rows `start..start+len` of x [T, H, hd] as contiguous heads [H*n, L, hd], each head repeated n
/// times (grouped-query attention: n = Hq / Hkv for keys and values, 1 for queries).
pub fn segment_heads(x: &Tensor, start: usize, len: usize, n: usize) -> candle_core::Result<Tensor> {
    repeat_kv(&x.narrow(0, start, len)?.transpose(0, 1)?, n)
}

/// [Hkv, L, hd] -> [Hkv*n, L, hd] for grouped-query attention.
pub fn repeat_kv(x: &Tensor, n: usize) -> candle_core::Result<Tensor> {
    if n == 1 {
        return x.contiguous();
    }
    let (h, l, d) = x.dims3()?;
    x.unsqueeze(1)?.expand((h, n, l, d))?.reshape((h * n, l, d))
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rand(shape: (usize, usize), seed: u64) -> Tensor {
        let mut r = crate::split::SplitMix64::new(seed);
        let v: Vec<f32> =
            (0..shape.0 * shape.1).map(|_| ((r.next_u64() >> 40) as f32 / (1u64 << 24) as f32) - 0.5).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// d(sum(f(x) * probe))/dx by central differences versus backprop, in f64 arithmetic on f32 data.
    fn check_grad(f: impl Fn(&Tensor) -> candle_core::Result<Tensor>, x0: &Tensor, tol: f64) {
        let x = Var::from_tensor(x0).unwrap();
        let y = f(x.as_tensor()).unwrap();
        let probe = rand(y.dims2().unwrap(), 99);
        let loss = (y * &probe).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap().get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let base: Vec<f32> = x0.flatten_all().unwrap().to_vec1().unwrap();
        let eps = 1e-2f32;
        for i in (0..base.len()).step_by(7) {
            let at = |d: f32| {
                let mut v = base.clone();
                v[i] += d;
                let t = Tensor::from_vec(v, x0.shape(), &Device::Cpu).unwrap();
                (f(&t).unwrap() * &probe).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps as f64);
            assert!(
                (fd - g[i] as f64).abs() < tol * (1.0 + fd.abs()),
                "element {i}: finite difference {fd}, backprop {}",
                g[i]
            );
        }
    }

    #[test]
    fn frozen_matmul_matches_matmul_and_finite_differences() {
        let x = rand((5, 8), 1);
        let w = rand((6, 8), 2);
        let y = frozen_linear(&x, &w).unwrap();
        let r = x.matmul(&w.t().unwrap()).unwrap();
        let diff = (y - r).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6);
        check_grad(|x| frozen_linear(x, &w), &x, 1e-2);
        // The input gradient equals candle's own matmul gradient exactly.
        let xv = Var::from_tensor(&x).unwrap();
        let g1 = frozen_linear(xv.as_tensor(), &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = xv.as_tensor().matmul(&w.t().unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
        let d = (g1.get(xv.as_tensor()).unwrap() - g2.get(xv.as_tensor()).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn rms_norm_and_rope_have_correct_gradients() {
        let w = (rand((1, 8), 3) + 1.0).unwrap().squeeze(0).unwrap();
        check_grad(|x| rms_norm(x, &w, 1e-5), &rand((4, 8), 4), 2e-2);
        let cos = rand((4, 8), 5).cos().unwrap();
        let sin = rand((4, 8), 6).sin().unwrap();
        check_grad(|x| rope(&x.reshape((4, 1, 8))?, &cos, &sin)?.reshape((4, 8)), &rand((4, 8), 7), 2e-2);
    }

    #[test]
    fn segments_do_not_attend_to_each_other() {
        // Changing the second segment's values must not change the first segment's output.
        let q = rand((6, 8), 8).reshape((6, 2, 4)).unwrap();
        let k = rand((6, 4), 9).reshape((6, 1, 4)).unwrap();
        let v1 = rand((6, 4), 10).reshape((6, 1, 4)).unwrap();
        let v2 = Tensor::cat(&[v1.narrow(0, 0, 2).unwrap(), (v1.narrow(0, 2, 4).unwrap() * 5.0).unwrap()], 0).unwrap();
        let mut m = MaskCache::default();
        let a = segment_attention(&q, &k, &v1, &[2, 4], &mut m).unwrap();
        let b = segment_attention(&q, &k, &v2, &[2, 4], &mut m).unwrap();
        let d = (a.narrow(0, 0, 2).unwrap() - b.narrow(0, 0, 2).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
        // And causality inside a segment: the first token sees only itself.
        let first = a.narrow(0, 0, 1).unwrap().reshape((2, 4)).unwrap();
        let want = Tensor::cat(
            &[
                v1.narrow(0, 0, 1).unwrap().reshape((1, 4)).unwrap(),
                v1.narrow(0, 0, 1).unwrap().reshape((1, 4)).unwrap(),
            ],
            0,
        )
        .unwrap();
        let d = (first - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-6);
    }
}

/// Row-wise kernels shared by the fused CPU ops below.
fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

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
                let dot: f32 = prow[..=i].iter().zip(&grow[..=i]).map(|(a, b)| a * b).sum();
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

/// Launches tunekit's own kernels (src/train/kernels/attention.cu, PTX built by build.rs).
#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, Layout, Shape};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));

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

/// RMSNorm with a frozen weight in one pass, backward to the input only:
/// `dx = r * (w*dy) - x * r^3 / H * sum(w*dy*x)` with `r = 1/sqrt(mean(x^2) + eps)`.
pub struct RmsNormOp {
    pub w: Vec<f32>,
    pub eps: f32,
}

impl CustomOp1 for RmsNormOp {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let h = self.w.len();
        let x = contiguous_f32(s, l, "rms-norm")?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(h.max(1) * 64).zip(x.par_chunks(h.max(1) * 64)).for_each(|(o, xs)| {
            for (orow, row) in o.chunks_mut(h).zip(xs.chunks(h)) {
                let ms = row.iter().map(|v| v * v).sum::<f32>() / h as f32;
                let r = 1.0 / (ms + self.eps).sqrt();
                for ((oj, &v), &w) in orow.iter_mut().zip(row).zip(&self.w) {
                    *oj = v * r * w;
                }
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        use rayon::prelude::*;
        let h = self.w.len();
        let xv = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let gv = dy.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut d = vec![0f32; xv.len()];
        d.par_chunks_mut(h * 64).zip(xv.par_chunks(h * 64).zip(gv.par_chunks(h * 64))).for_each(|(dd, (xs, gs))| {
            for ((drow, row), grow) in dd.chunks_mut(h).zip(xs.chunks(h)).zip(gs.chunks(h)) {
                let ms = row.iter().map(|v| v * v).sum::<f32>() / h as f32;
                let r = 1.0 / (ms + self.eps).sqrt();
                let dot: f32 = row.iter().zip(grow).zip(&self.w).map(|((x, g), w)| x * g * w).sum();
                let k = r * r * r * dot / h as f32;
                for (((dj, &xj), &gj), &wj) in drow.iter_mut().zip(row).zip(grow).zip(&self.w) {
                    *dj = r * wj * gj - xj * k;
                }
            }
        });
        Ok(Some(Tensor::from_vec(d, x.shape(), x.device())?))
    }
}

#[cfg(test)]
pub(crate) mod fused_tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Uniform values in [-1, 1) from a seed.
    pub(crate) fn rand(shape: &[usize], seed: u64) -> Tensor {
        let mut r = crate::split::SplitMix64::new(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| ((r.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn grads_match(a: impl Fn(&Tensor) -> Tensor, b: impl Fn(&Tensor) -> Tensor, x0: &Tensor) {
        let probe = rand(x0.dims(), 77);
        let run = |f: &dyn Fn(&Tensor) -> Tensor| {
            let x = Var::from_tensor(x0).unwrap();
            let y = f(x.as_tensor());
            let g = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap().get(x.as_tensor()).unwrap().clone();
            (y, g)
        };
        let (ya, ga) = run(&a);
        let (yb, gb) = run(&b);
        let dy = (ya - yb).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let dg = (ga - gb).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(dy < 1e-5 && dg < 1e-5, "value differs by {dy}, gradient by {dg}");
    }

    #[test]
    fn fused_attention_probabilities_match_matmul_then_masked_softmax() {
        let (q0, k0) = (rand(&[2, 6, 4], 11), rand(&[2, 6, 4], 12));
        let probe = rand(&[2, 6, 6], 13);
        let run = |fused: bool| {
            let (q, k) = (Var::from_tensor(&q0).unwrap(), Var::from_tensor(&k0).unwrap());
            let p = if fused {
                q.as_tensor().apply_op2(k.as_tensor(), CausalAttentionProbs { scale: 0.5 }).unwrap()
            } else {
                let s = q.as_tensor().matmul(&k.as_tensor().t().unwrap()).unwrap();
                let mut m = MaskCache::default();
                let masked = (s * 0.5).unwrap().broadcast_add(&m.get(6, &Device::Cpu).unwrap()).unwrap();
                candle_nn::ops::softmax(&masked, D::Minus1).unwrap()
            };
            let g = (&p * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let (gq, gk) = (g.get(q.as_tensor()).unwrap().clone(), g.get(k.as_tensor()).unwrap().clone());
            (p, gq, gk)
        };
        let (a, b) = (run(true), run(false));
        for (x, y, what) in [(&a.0, &b.0, "probabilities"), (&a.1, &b.1, "dq"), (&a.2, &b.2, "dk")] {
            let d = (x - y).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-5, "{what} differ by {d}");
        }
    }

    #[test]
    fn causal_softmax_matches_masked_softmax() {
        let s = rand(&[3, 5, 5], 1);
        grads_match(
            |x| x.apply_op1(CausalSoftmax { scale: 0.5 }).unwrap(),
            |x| {
                let mut m = MaskCache::default();
                candle_nn::ops::softmax(
                    &(x * 0.5).unwrap().broadcast_add(&m.get(5, &Device::Cpu).unwrap()).unwrap(),
                    D::Minus1,
                )
                .unwrap()
            },
            &s,
        );
    }

    #[test]
    fn rms_norm_op_matches_basic_ops() {
        let x = rand(&[6, 8], 2);
        let w = rand(&[8], 3);
        let wv = w.to_vec1::<f32>().unwrap();
        grads_match(
            |x| x.apply_op1(RmsNormOp { w: wv.clone(), eps: 1e-5 }).unwrap(),
            |x| rms_norm(x, &w, 1e-5).unwrap(),
            &x,
        );
    }
}
