//! The gated MLP's activation as one graph node keeping only g and u, with the backward in f32:
//! SwiGLU `silu(g) * u` (on the CPU in f32: one pass each way, `cpu::swiglu`) and GeGLU
//! `gelu_tanh(g) * u` (Gemma), chosen by the family ([`gated`]).

use super::family::Activation;
use crate::train::cpu::swiglu as kernel;
use crate::train::graph::{attached_forward, with_cpu_f32};
use candle_core::{CustomOp2, DType, Tensor};

/// Whether the one-pass CPU kernels compute SwiGLU for these inputs.
fn on_cpu_f32(g: &Tensor) -> bool {
    g.device().is_cpu() && g.dtype() == DType::F32
}

/// The family's gated activation of g and u.
pub fn gated(activation: Activation, g: &Tensor, u: &Tensor) -> candle_core::Result<Tensor> {
    match activation {
        Activation::Silu => swiglu(g, u),
        Activation::GeluTanh => geglu(g, u),
    }
}

/// `gelu_tanh(g) * u`, GELU's tanh approximation as PyTorch's `gelu(approximate="tanh")`.
pub fn geglu(g: &Tensor, u: &Tensor) -> candle_core::Result<Tensor> {
    let y = (g.detach().gelu()? * u.detach())?;
    Ok(y.with_backward2(g, u, GeGluFn))
}

struct GeGluFn;

impl CustomOp2 for GeGluFn {
    fn name(&self) -> &'static str {
        "geglu"
    }

    attached_forward!(2);

    /// With t = tanh(a (g + b g^3)): gelu = g (1 + t) / 2 and
    /// d gelu / dg = (1 + t) / 2 + g (1 - t^2) a (1 + 3 b g^2) / 2.
    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        const A: f64 = 0.797_884_560_802_865_4; // sqrt(2 / pi)
        const B: f64 = 0.044715;
        let dt = g.dtype();
        let (g, u, dy) = (g.detach().to_dtype(DType::F32)?, u.detach().to_dtype(DType::F32)?, dy.to_dtype(DType::F32)?);
        let g2 = g.sqr()?;
        let t = ((&g * ((&g2 * B)? + 1.0)?)? * A)?.tanh()?;
        let one_plus_t = (&t + 1.0)?;
        let du = (&dy * ((&g * &one_plus_t)? * 0.5)?)?;
        let slope = ((&g * (1.0 - t.sqr()?)?)? * ((&g2 * (3.0 * B))? + 1.0)?)?;
        let dgelu = ((one_plus_t + (slope * A)?)? * 0.5)?;
        let dg = ((dy * u)? * dgelu)?;
        Ok((Some(dg.to_dtype(dt)?), Some(du.to_dtype(dt)?)))
    }
}

/// `silu(g) * u`.
pub fn swiglu(g: &Tensor, u: &Tensor) -> candle_core::Result<Tensor> {
    let y = match on_cpu_f32(g) {
        true => Tensor::from_vec(with_cpu_f32(&[g, u], |x| kernel::forward(x[0], x[1]))?, g.shape(), g.device())?,
        false => (g.detach().silu()? * u.detach())?,
    };
    Ok(y.with_backward2(g, u, SwiGluFn))
}

struct SwiGluFn;

impl CustomOp2 for SwiGluFn {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    attached_forward!(2);

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dt = g.dtype();
        let (g, u) = (g.detach(), u.detach());
        if on_cpu_f32(&g) {
            let (dg, du) = with_cpu_f32(&[&g, &u, dy], |x| kernel::backward(x[0], x[1], x[2]))?;
            let (shape, dev) = (g.shape(), g.device());
            return Ok((Some(Tensor::from_vec(dg, shape, dev)?), Some(Tensor::from_vec(du, shape, dev)?)));
        }
        let (g, u, dy) = (g.to_dtype(DType::F32)?, u.to_dtype(DType::F32)?, dy.to_dtype(DType::F32)?);
        let s = (g.neg()?.exp()? + 1.0)?.recip()?; // sigmoid
        let du = (&dy * (&g * &s)?)?;
        // d silu / dg = s * (1 + g * (1 - s))
        let dsilu = (&s * ((&g * (1.0 - &s)?)? + 1.0)?)?;
        let dg = ((dy * u)? * dsilu)?;
        Ok((Some(dg.to_dtype(dt)?), Some(du.to_dtype(dt)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::graph::testing::{rand, same_as_graph};

    #[test]
    fn swiglu_matches_the_graph() {
        // Small (the scalar tail) and past a parallel chunk with a tail (the AVX2 path and the rest).
        for shape in [[4, 7], [300, 77]] {
            same_as_graph(
                |t| swiglu(&t[0], &t[1]).unwrap(),
                |t| (t[0].silu().unwrap() * &t[1]).unwrap(),
                &[(rand(&shape, 7) * 6.0).unwrap(), rand(&shape, 8)],
            );
        }
    }

    #[test]
    fn geglu_matches_the_graph() {
        let tanh_gelu = |g: &Tensor| -> Tensor {
            let cube = (g.sqr().unwrap() * g).unwrap();
            let inner = ((g + (cube * 0.044715).unwrap()).unwrap() * 0.797_884_560_802_865_4).unwrap();
            ((g * 0.5).unwrap() * (inner.tanh().unwrap() + 1.0).unwrap()).unwrap()
        };
        same_as_graph(
            |t| geglu(&t[0], &t[1]).unwrap(),
            |t| (tanh_gelu(&t[0]) * &t[1]).unwrap(),
            &[(rand(&[5, 9], 3) * 4.0).unwrap(), rand(&[5, 9], 4)],
        );
    }
}
