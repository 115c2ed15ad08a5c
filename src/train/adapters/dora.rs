//! DoRA (PEFT's `use_dora`): a LoRA adapter plus a trained magnitude per output row. The adapted
//! weight's direction is `W + s B A`, its row lengths the magnitudes `m`; PEFT detaches the norm
//! `||W + s B A||_row`, so only m, A and B train. The layer's output as PEFT's `DoraLinearLayer`
//! adds it to the base layer's ([`dora_linear`]), in plain graph operations.

use super::lora::Lora;
use candle_core::{DType, Tensor, Var};

/// DoRA's row norms `||W + s B A||` [out] of a frozen weight `w` [out, in] and an adapter, detached
/// (PEFT detaches the norm: only the magnitude and the direction's adapter train).
pub fn dora_norm(w: &Tensor, l: &Lora) -> candle_core::Result<Tensor> {
    let ba = l.b.as_tensor().detach().matmul(&l.a.as_tensor().detach())?;
    (w.detach().to_dtype(DType::F32)? + (ba * l.scale)?)?.sqr()?.sum(1)?.sqrt()
}

/// A DoRA layer's output: `base(x) + (g - 1) base(xd) + g s (xd A^T B^T)` with `g = m / ||W + s B A||`
/// and xd the dropped-out input (x itself without dropout), as PEFT's `DoraLinearLayer` adds it to
/// the base layer's output; `base` is the frozen product (its backward the input gradient only) and
/// `bias` is added once. Plain graph operations, in f32.
pub fn dora_linear(
    x: &Tensor,
    base: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>,
    w: &Tensor,
    bias: Option<&Tensor>,
    l: &Lora,
    m: &Var,
    mask: Option<Tensor>,
) -> candle_core::Result<Tensor> {
    let x32 = x.to_dtype(DType::F32)?;
    let g = m.as_tensor().broadcast_div(&dora_norm(w, l)?)?.unsqueeze(0)?;
    let base_x = base(&x32)?;
    let (xd, base_xd) = match mask {
        Some(mask) => {
            let xd = (&x32 * mask)?;
            let b = base(&xd)?;
            (xd, b)
        }
        None => (x32.clone(), base_x.clone()),
    };
    let lora = (xd.matmul(&l.a.as_tensor().t()?)?.matmul(&l.b.as_tensor().t()?)? * l.scale)?;
    let y = ((base_x + base_xd.broadcast_mul(&(&g - 1.0)?)?)? + lora.broadcast_mul(&g)?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?)?,
        None => y,
    };
    y.to_dtype(x.dtype())
}
