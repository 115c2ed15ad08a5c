//! The gated MLP's activation, SwiGLU: `silu(g) * u` as one graph node keeping only g and u, with
//! the backward in f32.

use crate::train::graph::attached_forward;
use candle_core::{CustomOp2, DType, Tensor};

/// `silu(g) * u`.
pub fn swiglu(g: &Tensor, u: &Tensor) -> candle_core::Result<Tensor> {
    let y = (g.detach().silu()? * u.detach())?;
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
        same_as_graph(
            |t| swiglu(&t[0], &t[1]).unwrap(),
            |t| (t[0].silu().unwrap() * &t[1]).unwrap(),
            &[rand(&[4, 7], 7), rand(&[4, 7], 8)],
        );
    }
}
