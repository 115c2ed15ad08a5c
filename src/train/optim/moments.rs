//! AdamW's moments of one variable and their update on the CPU: f32, or 8-bit blockwise
//! ([`super::blockwise8`]), each updated together with the weight in one parallel pass in place
//! (no temporaries: a full fine-tune's states are twice its weights). On a GPU the moments are
//! tensors that the in-place kernels update.

use super::blockwise8::{dynamic_map, quantise_block, Blockwise8, Lookup, BLOCK};
use candle_core::{CpuStorage, InplaceOp2, Layout, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// One variable's first and second moments.
pub enum Moments {
    /// Tensors on the variable's device (a GPU's in-place kernels update them).
    Tensors { m: Tensor, v: Tensor },
    /// f32 on the CPU.
    F32 { m: Vec<f32>, v: Vec<f32> },
    /// 8-bit blockwise on the CPU (`--optim adamw_8bit`).
    Q8 { m: Blockwise8, v: Blockwise8 },
}

impl Moments {
    /// Bytes the moments hold.
    pub fn bytes(&self) -> usize {
        match self {
            Moments::Tensors { m, v } => (m.elem_count() + v.elem_count()) * m.dtype().size_in_bytes(),
            Moments::F32 { m, v } => 4 * (m.len() + v.len()),
            Moments::Q8 { m, v } => m.bytes() + v.bytes(),
        }
    }
}

/// One step's constants, as torch's AdamW applies them: `p <- p decay - step_size m / (sqrt(v) /
/// sqrt_bc2 + eps)` after the moments' update.
#[derive(Clone, Copy)]
pub struct Hyper {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// `1 - lr * weight_decay`.
    pub decay: f32,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f32,
    /// `sqrt(1 - beta2^t)`.
    pub sqrt_bc2: f32,
}

impl Hyper {
    /// One value's update: the moments in place, the new weight returned.
    #[inline]
    fn apply(&self, p: f32, g: f32, m: &mut f32, v: &mut f32) -> f32 {
        *m = self.beta1 * *m + (1.0 - self.beta1) * g;
        *v = self.beta2 * *v + (1.0 - self.beta2) * g * g;
        let denom = v.sqrt() / self.sqrt_bc2 + self.eps;
        p * self.decay + (-self.step_size) * (*m / denom)
    }
}

/// The in-place CPU update of a weight (the op's destination) with its gradient (the op's source)
/// and the moments it holds.
pub struct CpuStep<'a> {
    pub moments: Mutex<&'a mut Moments>,
    pub hyper: Hyper,
}

/// Values per parallel task of the f32 update.
const CHUNK: usize = 1 << 14;

impl InplaceOp2 for CpuStep<'_> {
    fn name(&self) -> &'static str {
        "adamw-cpu"
    }

    fn cpu_fwd(&self, ps: &mut CpuStorage, pl: &Layout, gs: &CpuStorage, gl: &Layout) -> candle_core::Result<()> {
        let (Some((p0, p1)), Some((g0, g1))) = (pl.contiguous_offsets(), gl.contiguous_offsets()) else {
            candle_core::bail!("adamw: weights and gradients must be contiguous")
        };
        let (CpuStorage::F32(p), CpuStorage::F32(g)) = (ps, gs) else {
            candle_core::bail!("adamw: the CPU update is for f32 weights and gradients")
        };
        let (p, g) = (&mut p[p0..p1], &g[g0..g1]);
        let h = self.hyper;
        let mut moments = self.moments.lock().map_err(|_| candle_core::Error::Msg("adamw: poisoned state".into()))?;
        match &mut **moments {
            Moments::F32 { m, v } => {
                p.par_chunks_mut(CHUNK)
                    .zip(g.par_chunks(CHUNK))
                    .zip(m.par_chunks_mut(CHUNK))
                    .zip(v.par_chunks_mut(CHUNK))
                    .for_each(|(((p, g), m), v)| {
                        for (((p, g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                            *p = h.apply(*p, *g, m, v);
                        }
                    });
            }
            Moments::Q8 { m, v } => {
                let (sm, um) = (dynamic_map(true), dynamic_map(false));
                let (sl, ul) = (Lookup::of(true), Lookup::of(false));
                p.par_chunks_mut(BLOCK)
                    .zip(g.par_chunks(BLOCK))
                    .zip(m.codes.par_chunks_mut(BLOCK).zip(m.absmax.par_iter_mut()))
                    .zip(v.codes.par_chunks_mut(BLOCK).zip(v.absmax.par_iter_mut()))
                    .for_each(|(((p, g), (mc, ma)), (vc, va))| {
                        let (mut mb, mut vb) = ([0f32; BLOCK], [0f32; BLOCK]);
                        let n = p.len();
                        for j in 0..n {
                            mb[j] = sm[mc[j] as usize] * *ma;
                            vb[j] = um[vc[j] as usize] * *va;
                            p[j] = h.apply(p[j], g[j], &mut mb[j], &mut vb[j]);
                        }
                        *ma = quantise_block(sl, &mb[..n], mc);
                        *va = quantise_block(ul, &vb[..n], vc);
                    });
            }
            Moments::Tensors { .. } => candle_core::bail!("adamw: tensor moments are updated by tensor ops"),
        }
        Ok(())
    }
}
