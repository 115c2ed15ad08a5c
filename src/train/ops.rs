//! Differentiable building blocks that candle lacks or does wastefully: a frozen-weight matmul
//! whose backward returns only the input gradient, RMSNorm and rotary embeddings from basic ops
//! (candle's fused versions have no backward), and causal attention per packed segment.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor, D};

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
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
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
        let qs = q.narrow(0, start, len)?.transpose(0, 1)?.contiguous()?; // [Hq, L, hd]
        let ks = repeat_kv(&k.narrow(0, start, len)?.transpose(0, 1)?, hq / hkv)?; // [Hq, L, hd]
        let vs = repeat_kv(&v.narrow(0, start, len)?.transpose(0, 1)?, hq / hkv)?;
        let scores = (qs.matmul(&ks.t()?)? * scale)?.broadcast_add(&masks.get(len, q.device())?)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let o = probs.matmul(&vs)?; // [Hq, L, hd]
        outs.push(o.transpose(0, 1)?.reshape((len, hq * hd))?);
        start += len;
    }
    Tensor::cat(&outs, 0)
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
