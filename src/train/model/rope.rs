//! Rotary position embeddings in Hugging Face's layout (`x * cos + rotate_half(x) * sin`): the
//! cos/sin table of one of a model's rotary embeddings ([`RopeTable`], scaling included through the
//! family's inverse frequencies; LongRoPE's two tables in [`RotaryTable`]) and the rotation as one
//! graph node over x ([`rope`]), over the first dimensions of each head only where the rotary is
//! partial ([`rope_partial`]); on the CPU in f32 one pass each way (`cpu::rope`).

use super::family::Rotary;
use crate::train::cpu::rope as kernel;
use crate::train::graph::{attached_forward, with_cpu_f32};
use candle_core::{CustomOp1, DType, Device, Tensor, D};

/// cos and sin of every position up to the table's length, [positions, head_dim].
pub struct RopeTable {
    cos: Tensor,
    sin: Tensor,
}

impl RopeTable {
    /// The table for inverse frequencies `inv_freq` over `max_pos` positions, in `dtype`.
    pub fn new(inv_freq: &[f64], max_pos: usize, dtype: DType, device: &Device) -> candle_core::Result<Self> {
        Self::scaled(inv_freq, 1.0, max_pos, dtype, device)
    }

    /// The same with cos and sin multiplied by `scale` (LongRoPE's attention factor).
    pub fn scaled(
        inv_freq: &[f64],
        scale: f64,
        max_pos: usize,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let inv: Vec<f32> = inv_freq.iter().map(|&f| f as f32).collect();
        let t = Tensor::arange(0u32, max_pos as u32, device)?.to_dtype(DType::F32)?.reshape((max_pos, 1))?;
        let freqs = t.broadcast_mul(&Tensor::from_vec(inv.clone(), (1, inv.len()), device)?)?;
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?;
        let (cos, sin) = match scale {
            1.0 => (emb.cos()?, emb.sin()?),
            s => ((emb.cos()? * s)?, (emb.sin()? * s)?),
        };
        Ok(RopeTable { cos: cos.to_dtype(dtype)?, sin: sin.to_dtype(dtype)? })
    }

    /// cos and sin gathered at `positions` [T] (u32).
    pub fn at(&self, positions: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((self.cos.index_select(positions, 0)?, self.sin.index_select(positions, 0)?))
    }
}

/// One rotary embedding of a model: its table, and LongRoPE's table for sequences that reach past
/// the original context (chosen by the highest position, as transformers does).
pub struct RotaryTable {
    short: RopeTable,
    long: Option<(usize, RopeTable)>,
}

impl RotaryTable {
    pub fn new(r: &Rotary, max_pos: usize, dtype: DType, device: &Device) -> candle_core::Result<Self> {
        let long = match &r.long {
            Some((from, inv)) => Some((*from, RopeTable::scaled(inv, r.scale, max_pos, dtype, device)?)),
            None => None,
        };
        Ok(RotaryTable { short: RopeTable::scaled(&r.inv_freq, r.scale, max_pos, dtype, device)?, long })
    }

    /// cos and sin at `positions` [T] (u32).
    pub fn at(&self, positions: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        if let Some((from, long)) = &self.long {
            if positions.max_all()?.to_scalar::<u32>()? as usize >= *from {
                return long.at(positions);
            }
        }
        self.short.at(positions)
    }
}

/// `rope` over the first `cos.dim(1)` dimensions of each head of x [T, heads, hd], the rest passed
/// through (partial rotary).
pub fn rope_partial(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let (rot, hd) = (cos.dim(D::Minus1)?, x.dim(D::Minus1)?);
    if rot == hd {
        return rope(x, cos, sin);
    }
    let turned = rope(&x.narrow(D::Minus1, 0, rot)?.contiguous()?, cos, sin)?;
    Tensor::cat(&[&turned, &x.narrow(D::Minus1, rot, hd - rot)?], D::Minus1)
}

/// Rotates x [T, heads, hd] with cos/sin [T, hd] gathered by position; keeps nothing but cos/sin
/// for the backward.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let y = match on_cpu_f32(x, cos) {
        true => rotate_cpu(&x.detach(), cos, sin, false)?,
        false => rope_graph(&x.detach(), cos, sin)?,
    };
    Ok(y.with_backward1(x, RopeFn { cos: cos.clone(), sin: sin.clone() }))
}

/// Whether the one-pass CPU kernel rotates these inputs.
fn on_cpu_f32(x: &Tensor, cos: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && cos.dtype() == DType::F32 && x.rank() == 3
}

/// The rotation (or its transpose, for the backward) of x [T, heads, hd] by the CPU kernel.
fn rotate_cpu(x: &Tensor, cos: &Tensor, sin: &Tensor, backward: bool) -> candle_core::Result<Tensor> {
    let (_, heads, hd) = x.dims3()?;
    let y = with_cpu_f32(&[x, cos, sin], |t| kernel::rotate(t[0], t[1], t[2], heads, hd, backward))?;
    Tensor::from_vec(y, x.shape(), x.device())
}

/// The rotation from basic ops.
fn rope_graph(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let (cos, sin) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?);
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

struct RopeFn {
    cos: Tensor,
    sin: Tensor,
}

impl CustomOp1 for RopeFn {
    fn name(&self) -> &'static str {
        "rope"
    }

    attached_forward!(1);

    /// y = x cos + rot(x) sin with rot([x1, x2]) = [-x2, x1], so dx = dy cos + [z2, -z1], z = dy sin.
    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if on_cpu_f32(dy, &self.cos) {
            return Ok(Some(rotate_cpu(dy, &self.cos, &self.sin, true)?));
        }
        let hd = dy.dim(D::Minus1)?;
        let (cos, sin) = (self.cos.unsqueeze(1)?, self.sin.unsqueeze(1)?);
        let z = dy.broadcast_mul(&sin)?;
        let back =
            Tensor::cat(&[&z.narrow(D::Minus1, hd / 2, hd / 2)?, &z.narrow(D::Minus1, 0, hd / 2)?.neg()?], D::Minus1)?;
        Ok(Some((dy.broadcast_mul(&cos)? + back)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::graph::testing::{check_grad, rand, same_as_graph};

    #[test]
    fn the_graph_form_has_correct_gradients() {
        let half = |s: &[usize], seed| (rand(s, seed) * 0.5).unwrap();
        let cos = half(&[4, 8], 5).cos().unwrap();
        let sin = half(&[4, 8], 6).sin().unwrap();
        check_grad(|x| rope_graph(&x.reshape((4, 1, 8))?, &cos, &sin)?.reshape((4, 8)), &half(&[4, 8], 7), 2e-2);
    }

    #[test]
    fn attached_rope_matches_the_graph() {
        // 5 tokens (one parallel task) and 40 (past a task, with a tail); cos and sin of unequal
        // halves, so a swapped half in the kernel's backward cannot pass.
        for t in [5, 40] {
            let (cos, sin) = (rand(&[t, 8], 9), rand(&[t, 8], 10));
            same_as_graph(
                |x| rope(&x[0], &cos, &sin).unwrap(),
                |x| rope_graph(&x[0], &cos, &sin).unwrap(),
                &[rand(&[t, 3, 8], 11)],
            );
        }
    }
}
