//! RMSNorm with a frozen weight, as transformers' LlamaRMSNorm computes it (normalise in f32, cast to
//! the compute dtype, scale), keeping only its input for the backward
//! `dx = r * (w*dy) - x * r^3 / H * sum(w*dy*x)` with `r = 1/sqrt(mean(x^2) + eps)`.
//! On the CPU in f32 one fused pass forward and backward; elsewhere basic ops outside the graph and
//! the same backward attached.

use crate::train::cpu::output_buffer;
use crate::train::cpu::reduce::{dot, dot3};
use crate::train::graph::{attached_forward, contiguous_f32, with_cpu_f32};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor, D};

/// `x / sqrt(mean(x^2) + eps) * w` over the last dimension.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if w.is_variable() && crate::train::graph::recording() {
        return rms_norm_trained(x, w, eps);
    }
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        let wv = w.flatten_all()?.to_vec1::<f32>()?;
        return x.contiguous()?.apply_op1(RmsNormOp { w: wv, eps: eps as f32 });
    }
    let y = rms_norm_graph(&x.detach(), w, eps)?;
    Ok(y.with_backward1(x, RmsNormFn { w: w.clone(), eps }))
}

/// RMSNorm with a trained weight (full fine-tuning): on the CPU in f32 the fused forward, attached
/// over (x, w) with one pass giving both gradients (`dw = sum over rows of dy * x * r`); the graph
/// of basic ops elsewhere.
fn rms_norm_trained(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if !(x.device().is_cpu() && x.dtype() == DType::F32) {
        return rms_norm_graph(x, w, eps);
    }
    let wv = w.flatten_all()?.to_vec1::<f32>()?;
    let y = x.detach().contiguous()?.apply_op1(RmsNormOp { w: wv, eps: eps as f32 })?;
    Ok(y.with_backward2(x, w, RmsNormTrainedFn { eps: eps as f32 }))
}

/// The backward of [`rms_norm_trained`] on the CPU: the input's gradient row by row as
/// [`RmsNormOp`]'s, and the weight's summed over the rows.
struct RmsNormTrainedFn {
    eps: f32,
}

impl CustomOp2 for RmsNormTrainedFn {
    fn name(&self) -> &'static str {
        "rms-norm-trained"
    }

    attached_forward!(2);

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        use rayon::prelude::*;
        let h = w.elem_count();
        let w = w.detach();
        let (dx, dw) = with_cpu_f32(&[x, dy, &w], |t| {
            let (xv, gv, wv) = (t[0], t[1], t[2]);
            let mut d = output_buffer(xv.len());
            let dw = d
                .par_chunks_mut(h * 64)
                .zip(xv.par_chunks(h * 64).zip(gv.par_chunks(h * 64)))
                .map(|(dd, (xs, gs))| {
                    let mut dw = vec![0f32; h];
                    for ((drow, row), grow) in dd.chunks_mut(h).zip(xs.chunks(h)).zip(gs.chunks(h)) {
                        let ms = dot(row, row) / h as f32;
                        let r = 1.0 / (ms + self.eps).sqrt();
                        let xgw = dot3(row, grow, wv);
                        let k = r * r * r * xgw / h as f32;
                        for ((((dj, &xj), &gj), &wj), dwj) in
                            drow.iter_mut().zip(row).zip(grow).zip(wv).zip(dw.iter_mut())
                        {
                            *dj = r * wj * gj - xj * k;
                            *dwj += gj * xj * r;
                        }
                    }
                    dw
                })
                .reduce(
                    || vec![0f32; h],
                    |mut a, b| {
                        a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                        a
                    },
                );
            (d, dw)
        })?;
        let dw = Tensor::from_vec(dw, w.shape(), w.device())?;
        Ok((Some(Tensor::from_vec(dx, x.shape(), x.device())?), Some(dw)))
    }
}

/// RMSNorm from basic ops (candle's graph records each of them).
fn rms_norm_graph(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let x32 = x.to_dtype(DType::F32)?;
    let ms = x32.sqr()?.mean_keepdim(D::Minus1)?;
    x32.broadcast_div(&(ms + eps)?.sqrt()?)?.to_dtype(x.dtype())?.broadcast_mul(w)
}

/// The backward of RMSNorm attached to a value computed outside the graph.
struct RmsNormFn {
    w: Tensor,
    eps: f64,
}

impl CustomOp1 for RmsNormFn {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    attached_forward!(1);

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let h = x.dim(D::Minus1)? as f64;
        let x32 = x.detach().to_dtype(DType::F32)?;
        let r = (x32.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?.recip()?;
        let gw = dy.to_dtype(DType::F32)?.broadcast_mul(&self.w.to_dtype(DType::F32)?)?;
        let k = ((r.powf(3.0)? * (&gw * &x32)?.sum_keepdim(D::Minus1)?)? / h)?;
        let dx = (gw.broadcast_mul(&r)? - x32.broadcast_mul(&k)?)?;
        Ok(Some(dx.to_dtype(x.dtype())?))
    }
}

/// RMSNorm on the CPU in f32, forward and backward each one pass over rows in parallel.
struct RmsNormOp {
    w: Vec<f32>,
    eps: f32,
}

impl CustomOp1 for RmsNormOp {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let h = self.w.len();
        let x = contiguous_f32(s, l, "rms-norm")?;
        let mut out = output_buffer(x.len());
        out.par_chunks_mut(h.max(1) * 64).zip(x.par_chunks(h.max(1) * 64)).for_each(|(o, xs)| {
            for (orow, row) in o.chunks_mut(h).zip(xs.chunks(h)) {
                let ms = dot(row, row) / h as f32;
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
        let d = with_cpu_f32(&[x, dy], |t| {
            let (xv, gv) = (t[0], t[1]);
            let mut d = output_buffer(xv.len());
            d.par_chunks_mut(h * 64).zip(xv.par_chunks(h * 64).zip(gv.par_chunks(h * 64))).for_each(
                |(dd, (xs, gs))| {
                    for ((drow, row), grow) in dd.chunks_mut(h).zip(xs.chunks(h)).zip(gs.chunks(h)) {
                        let ms = dot(row, row) / h as f32;
                        let r = 1.0 / (ms + self.eps).sqrt();
                        let xgw = dot3(row, grow, &self.w);
                        let k = r * r * r * xgw / h as f32;
                        for (((dj, &xj), &gj), &wj) in drow.iter_mut().zip(row).zip(grow).zip(&self.w) {
                            *dj = r * wj * gj - xj * k;
                        }
                    }
                },
            );
            d
        })?;
        Ok(Some(Tensor::from_vec(d, x.shape(), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::graph::testing::{check_grad, rand, same_as_graph};

    #[test]
    fn the_graph_form_has_correct_gradients() {
        let w = ((rand(&[1, 8], 3) * 0.5).unwrap() + 1.0).unwrap().squeeze(0).unwrap();
        check_grad(|x| rms_norm_graph(x, &w, 1e-5), &(rand(&[4, 8], 4) * 0.5).unwrap(), 2e-2);
    }

    #[test]
    fn fused_cpu_op_matches_basic_ops() {
        let w = rand(&[8], 3);
        let wv = w.to_vec1::<f32>().unwrap();
        same_as_graph(
            |t| t[0].apply_op1(RmsNormOp { w: wv.clone(), eps: 1e-5 }).unwrap(),
            |t| rms_norm_graph(&t[0], &w, 1e-5).unwrap(),
            &[rand(&[6, 8], 2)],
        );
    }

    #[test]
    fn trained_weight_gets_the_graphs_gradient() {
        same_as_graph(
            |t| rms_norm_trained(&t[0], &t[1], 1e-5).unwrap(),
            |t| rms_norm_graph(&t[0], &t[1], 1e-5).unwrap(),
            &[rand(&[130, 8], 21), rand(&[8], 22)],
        );
    }

    #[test]
    fn attached_backward_matches_the_graph() {
        let w = rand(&[8], 15);
        same_as_graph(
            |t| {
                rms_norm_graph(&t[0].detach(), &w, 1e-5)
                    .unwrap()
                    .with_backward1(&t[0], RmsNormFn { w: w.clone(), eps: 1e-5 })
            },
            |t| rms_norm_graph(&t[0], &w, 1e-5).unwrap(),
            &[rand(&[6, 8], 16)],
        );
    }
}
