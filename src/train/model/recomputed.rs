//! Attention whose backward recomputes the probabilities: the GPU's path (and wherever the tiled
//! CPU kernels do not run). Plain causal segments whose [heads, L, L] probabilities fit a budget
//! take the fused ops in one pass; longer ones, and windows and soft-caps, go a block of query rows
//! at a time over the keys each block reaches, so memory stays linear in the segment's length.

use super::softmax::{CausalAttentionProbs, CausalSoftmaxGrad};
use candle_core::{DType, Tensor};

/// The recomputing path's attention: the scores' scale, and a window and soft-cap, which only the
/// blocked form takes.
#[derive(Debug, Clone, Copy)]
pub struct Blocked {
    pub scale: f32,
    pub window: Option<usize>,
    pub softcap: Option<f32>,
}

impl Blocked {
    fn plain(&self) -> bool {
        self.window.is_none() && self.softcap.is_none()
    }

    /// The first key a block of queries starting at `o` sees.
    fn first_key(&self, o: usize) -> usize {
        self.window.map_or(0, |w| (o + 1).saturating_sub(w))
    }
}

/// The largest probabilities [Hq, rows, L] a segment forms at once on the recomputing path: above
/// it, the segment goes a block of query rows at a time (memory linear in its length).
pub const PROBS_BUDGET_BYTES: usize = 256 << 20;

/// Query rows per block for a segment of `len` tokens and `hq` heads under `budget` bytes of f32
/// probabilities; None where plain causal attention's whole [Hq, L, L] fits (the fused op, one
/// pass). A window or soft-cap always goes in blocks (one, where it fits).
fn query_block(hq: usize, len: usize, budget: usize, shape: Blocked) -> Option<usize> {
    let fits = hq * len * len * 4 <= budget;
    match (fits, shape.plain()) {
        (true, true) => None,
        (true, false) => Some(len.max(1)),
        (false, _) => Some((budget / (hq * len * 4)).max(16).min(len).max(1)),
    }
}

/// The attention's values over q [T, Hq, hd], k and v [T, Hkv, hd] (detached: no graph), [T, Hq*hd].
pub fn forward(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    seq_lengths: &[usize],
    shape: Blocked,
    budget: usize,
) -> candle_core::Result<Tensor> {
    let (_, hq, hd) = q.dims3()?;
    let n = hq / k.dim(1)?;
    // One segment's output [Hq, L, hd].
    let segment = |start: usize, len: usize| -> candle_core::Result<Tensor> {
        let (qs, ks, vs) =
            (segment_heads(q, start, len, 1)?, segment_heads(k, start, len, n)?, segment_heads(v, start, len, n)?);
        let Some(rows) = query_block(hq, len, budget, shape) else {
            return qs.apply_op2_no_bwd(&ks, &CausalAttentionProbs { scale: shape.scale })?.matmul(&vs);
        };
        let mut blocks = vec![];
        for o in (0..len).step_by(rows) {
            let (t, lo) = (rows.min(len - o), shape.first_key(o));
            let cols = o + t - lo;
            let (p, _) = block_probs(&qs.narrow(1, o, t)?, &ks.narrow(1, lo, cols)?, (o, lo), shape)?;
            blocks.push(p.to_dtype(vs.dtype())?.matmul(&vs.narrow(1, lo, cols)?)?);
        }
        Tensor::cat(&blocks, 1)
    };
    let starts = seq_lengths.iter().scan(0, |s, &l| {
        *s += l;
        Some(*s - l)
    });
    let outs = starts
        .zip(seq_lengths)
        .map(|(start, &len)| segment(start, len)?.transpose(0, 1)?.reshape((len, hq * hd)))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&outs, 0)
}

/// The probabilities of a segment's query rows `o..o + t` over its keys `lo..o + t`, [Hq, t, cols]
/// in f32 (qb [Hq, t, hd], kb [Hq, cols, hd]): causal and windowed, soft-capped where the shape
/// says, with the soft-cap's slope `1 - tanh^2` for the backward.
fn block_probs(
    qb: &Tensor,
    kb: &Tensor,
    (o, lo): (usize, usize),
    shape: Blocked,
) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    let (t, cols) = (qb.dim(1)?, kb.dim(1)?);
    let mut scores = (qb.matmul(&kb.t()?)?.to_dtype(DType::F32)? * shape.scale as f64)?;
    let mut slope = None;
    if let Some(c) = shape.softcap {
        let th = (scores / c as f64)?.tanh()?;
        slope = Some((1.0 - th.sqr()?)?);
        scores = (th * c as f64)?;
    }
    // Built on the device (no [t, cols] host buffer to upload per block): each key's distance
    // behind its query, seen where it is 0 up to the window.
    let dev = qb.device();
    let position = |from: usize, n: usize| Tensor::arange(from as u32, (from + n) as u32, dev)?.to_dtype(DType::F32);
    let behind = position(o, t)?.reshape((t, 1))?.broadcast_sub(&position(lo, cols)?.reshape((1, cols))?)?;
    let seen = (behind.ge(0.0)? * behind.lt(shape.window.map_or(f64::INFINITY, |w| w as f64))?)?;
    let hidden = Tensor::new(f32::NEG_INFINITY, dev)?.broadcast_as(scores.shape())?;
    let scores = seen.broadcast_as(scores.shape())?.where_cond(&scores, &hidden)?;
    Ok((candle_nn::ops::softmax_last_dim(&scores)?, slope))
}

/// The backward of one segment a block of query rows at a time (qs [Hq, L, hd], ks and vs repeated
/// to Hq heads, dos [Hq, L, hd]): each block's probabilities recomputed, dK and dV accumulated in
/// f32 over the blocks. (dQ, dK, dV) [Hq, L, hd] in the inputs' dtype.
fn segment_backward_in_blocks(
    (qs, ks, vs): (&Tensor, &Tensor, &Tensor),
    dos: &Tensor,
    shape: Blocked,
    rows: usize,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (hq, len, hd) = qs.dims3()?;
    let dtype = qs.dtype();
    let zeros = || Tensor::zeros((hq, len, hd), DType::F32, qs.device());
    let (dk, dv) = (zeros()?, zeros()?);
    let mut dqs = vec![];
    for o in (0..len).step_by(rows) {
        let (t, lo) = (rows.min(len - o), shape.first_key(o));
        let cols = o + t - lo;
        let (qb, kb, vb, dob) =
            (qs.narrow(1, o, t)?, ks.narrow(1, lo, cols)?, vs.narrow(1, lo, cols)?, dos.narrow(1, o, t)?);
        let (p, slope) = block_probs(&qb, &kb, (o, lo), shape)?;
        let dp = dob.matmul(&vb.t()?)?.to_dtype(DType::F32)?;
        // dS = scale * P * (dP - rowsum(dP * P)), times the soft-cap's slope.
        let mut ds = ((&p * dp.broadcast_sub(&(&dp * &p)?.sum_keepdim(2)?)?)? * shape.scale as f64)?;
        if let Some(k) = slope {
            ds = (ds * k)?;
        }
        let ds = ds.to_dtype(dtype)?;
        let add = |acc: &Tensor, part: Tensor| -> candle_core::Result<()> {
            let sum = (acc.narrow(1, lo, cols)? + part.to_dtype(DType::F32)?)?;
            acc.slice_set(&sum, 1, lo)
        };
        add(&dv, p.to_dtype(dtype)?.t()?.matmul(&dob)?)?;
        add(&dk, ds.t()?.matmul(&qb)?)?;
        dqs.push(ds.matmul(&kb)?);
    }
    Ok((Tensor::cat(&dqs, 1)?, dk.to_dtype(dtype)?, dv.to_dtype(dtype)?))
}

/// The gradients (dQ [T, Hq, hd], dK and dV [T, Hkv, hd]) of [`forward`] for the output gradient
/// dy [T, Hq*hd]: per segment, the probabilities recomputed, whole or by blocks as the forward went.
pub fn backward(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    dy: &Tensor,
    seq_lengths: &[usize],
    shape: Blocked,
    budget: usize,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (_, hq, hd) = q.dims3()?;
    let hkv = k.dim(1)?;
    let n = hq / hkv;
    let scale = shape.scale;
    let (mut dqs, mut dks, mut dvs) = (vec![], vec![], vec![]);
    let mut start = 0;
    for &len in seq_lengths {
        let qs = segment_heads(q, start, len, 1)?;
        let ks = segment_heads(k, start, len, n)?;
        let vs = segment_heads(v, start, len, n)?;
        let dos = dy.narrow(0, start, len)?.reshape((len, hq, hd))?.transpose(0, 1)?.contiguous()?;
        let (dq, dk, dv) = match query_block(hq, len, budget, shape) {
            Some(rows) => segment_backward_in_blocks((&qs, &ks, &vs), &dos, shape, rows)?,
            None => {
                let p = qs.apply_op2_no_bwd(&ks, &CausalAttentionProbs { scale })?;
                let dv = p.t()?.matmul(&dos)?;
                let dp = dos.matmul(&vs.t()?)?;
                let ds = p.apply_op2_no_bwd(&dp, &CausalSoftmaxGrad { scale })?;
                (ds.matmul(&ks)?, ds.t()?.matmul(&qs)?, dv)
            }
        };
        // Heads that share a key/value head add up their gradients: [Hq] -> [Hkv].
        let fold = |t: Tensor| -> candle_core::Result<Tensor> { t.reshape((hkv, n, len, hd))?.sum(1)?.transpose(0, 1) };
        dqs.push(dq.transpose(0, 1)?);
        dks.push(fold(dk)?);
        dvs.push(fold(dv)?);
        start += len;
    }
    Ok((Tensor::cat(&dqs, 0)?, Tensor::cat(&dks, 0)?, Tensor::cat(&dvs, 0)?))
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
