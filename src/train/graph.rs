//! How tunekit's layer pieces join candle's autograd graph: PyTorch's `autograd.Function` in candle.
//! A piece runs its forward on detached inputs (no graph), then attaches the value to the graph as
//! the output of an op over the piece's inputs only (`Tensor::with_backward*`, a patch of the
//! vendored candle-core), with a hand-written backward. The graph then keeps a piece's inputs and
//! output, never its temporaries; candle otherwise keeps every op's inputs alive until the backward
//! ends, which is most of a training step's memory.
//!
//! Also here: [`no_grad`] (evaluation and generation record nothing) and [`BaseOp`], the frozen
//! weight's matmul as an op whose backward gives the input gradient only ([`FrozenMatmul`] for a
//! dense weight; the quantised forms are in `model::quant`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Storage, Tensor};
use std::sync::Arc;

thread_local! {
    static NO_GRAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` without recording a graph (evaluation, generation): the adapters are the only variables
/// and enter detached, so nothing downstream is recorded either. Without it an eval pass would keep
/// every activation as training does, and generation would keep the graph of every past token through
/// its KV cache.
pub fn no_grad<T>(f: impl FnOnce() -> T) -> T {
    let before = NO_GRAD.with(|g| g.replace(true));
    let out = f();
    NO_GRAD.with(|g| g.set(before));
    out
}

/// Whether the pieces record a graph now (false inside [`no_grad`]).
pub fn recording() -> bool {
    !NO_GRAD.with(|g| g.get())
}

/// The frozen base of a linear layer: its op (forward `x W^T`, backward the input gradient only).
pub type BaseOp = Arc<Box<dyn CustomOp1 + Send + Sync>>;

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
        if let (CpuStorage::F32(xs), CpuStorage::F32(ws), Some((x0, x1)), Some((w0, w1))) =
            (x, w, xl.contiguous_offsets(), wl.contiguous_offsets())
        {
            let (xs, ws) = (&xs[x0..x1], &ws[w0..w1]);
            let y = if m <= crate::train::cpu::few_rows::MAX_ROWS {
                // A few rows (decoding): dot products, without packing the whole weight as a GEMM does.
                Some(crate::train::cpu::few_rows::matmul_t(xs, m, k, ws, n))
            } else if n >= crate::train::cpu::gemm::BANDED_MIN_ROWS {
                Some(crate::train::cpu::gemm::times_transposed(xs, m, k, ws, n))
            } else {
                None
            };
            if let Some(y) = y {
                return Ok((CpuStorage::F32(y), Shape::from((m, n))));
            }
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

/// The error of an attached op's forward, which is never run as an op.
pub fn attached_only<T>(name: &str) -> candle_core::Result<T> {
    candle_core::bail!("{name}: computed outside the graph and attached; its forward is not run as an op")
}

/// The `cpu_fwd` a CustomOp of `n` inputs must have; never called for an attached op.
macro_rules! attached_forward {
    (1) => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            $crate::train::graph::attached_only(self.name())
        }
    };
    (2) => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            $crate::train::graph::attached_only(self.name())
        }
    };
    (3) => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            $crate::train::graph::attached_only(self.name())
        }
    };
}
pub(crate) use attached_forward;

/// `y = x @ w^T` for a trained `w` [out, in] (full fine-tuning): the frozen matmul's forward,
/// attached over (x, w) with both gradients, `dx = dy w` and `dw = dy^T x`. Inside [`no_grad`]
/// the plain product.
pub fn trained_matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let y = x.detach().contiguous()?.apply_op1(FrozenMatmul { w: w.detach() })?;
    match recording() {
        true => Ok(y.with_backward2(x, w, TrainedMatmulFn)),
        false => Ok(y),
    }
}

/// The backward of [`trained_matmul`].
struct TrainedMatmulFn;

impl CustomOp2 for TrainedMatmulFn {
    fn name(&self) -> &'static str {
        "trained-matmul"
    }

    attached_forward!(2);

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.detach();
        let dx = dy.matmul(&w.detach())?;
        let dw = dy.t()?.matmul(&x.detach())?;
        Ok((Some(dx), Some(dw)))
    }
}

/// The f32 values of a contiguous CPU storage (the row-wise CPU kernels read their input this way).
pub fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// Runs `f` on the f32 values of CPU tensors (made contiguous first).
pub fn with_cpu_f32<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> candle_core::Result<R> {
    let cont: Vec<Tensor> = ts.iter().map(|t| t.contiguous()).collect::<candle_core::Result<_>>()?;
    let guards: Vec<_> = cont.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(ts.len());
    for (st, l) in &guards {
        let candle_core::Storage::Cpu(c) = &**st else { candle_core::bail!("CPU tensors expected") };
        slices.push(contiguous_f32(c, l, "a CPU kernel's input")?);
    }
    Ok(f(&slices))
}

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers for the pieces' tests: seeded inputs and a check that a piece equals the plain graph.
    use candle_core::{Device, Tensor, Var};

    /// Uniform values in [-1, 1) from a seed.
    pub fn rand(shape: &[usize], seed: u64) -> Tensor {
        let mut r = crate::split::SplitMix64::new(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| ((r.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// The fused form and the plain graph give the same value and the same gradient for every input.
    pub fn same_as_graph(fused: impl Fn(&[Tensor]) -> Tensor, plain: impl Fn(&[Tensor]) -> Tensor, inputs: &[Tensor]) {
        let run = |f: &dyn Fn(&[Tensor]) -> Tensor| {
            let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = f(&ts);
            let probe = rand(y.dims(), 99);
            let g = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let grads: Vec<Tensor> =
                ts.iter().map(|t| g.get(t).expect("every input gets a gradient").clone()).collect();
            (y, grads)
        };
        let (ya, ga) = run(&fused);
        let (yb, gb) = run(&plain);
        // A gradient that carries the forward graph along would keep it alive (in the optimiser's
        // state: a leak across steps).
        assert!(ga.iter().all(|g| !g.track_op()), "a gradient is still attached to the graph");
        assert!(max_diff(&ya, &yb) < 1e-5, "values differ by {}", max_diff(&ya, &yb));
        for (i, (a, b)) in ga.iter().zip(&gb).enumerate() {
            assert!(max_diff(a, b) < 1e-5, "gradient of input {i} differs by {}", max_diff(a, b));
        }
    }

    /// d(sum(f(x) * probe))/dx by central differences versus backprop, in f64 arithmetic on f32 data.
    pub fn check_grad(f: impl Fn(&Tensor) -> candle_core::Result<Tensor>, x0: &Tensor, tol: f64) {
        let x = Var::from_tensor(x0).unwrap();
        let y = f(x.as_tensor()).unwrap();
        let probe = (rand(y.dims(), 99) * 0.5).unwrap();
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
}

#[cfg(test)]
mod tests {
    use super::testing::{check_grad, rand};
    use super::*;
    use candle_core::Var;

    fn frozen_linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1(FrozenMatmul { w: w.clone() })
    }

    #[test]
    fn frozen_matmul_matches_matmul_and_finite_differences() {
        let x = (rand(&[5, 8], 1) * 0.5).unwrap();
        let w = (rand(&[6, 8], 2) * 0.5).unwrap();
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
}
