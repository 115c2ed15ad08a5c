//! Causal attention of one packed segment on the CPU, block by block: every product skips the
//! blocks of query and key positions above the diagonal, which the causal mask zeroes (at 512
//! positions in blocks of 64, 36 of the 64 blocks are computed: 56% of the full products' work).
//! Queries, keys, values and their gradients are read and written in place in the packed
//! [T, heads, head_dim] buffers (no per-head copies, no repeated key/value heads for grouped-query
//! attention); the probabilities [Hq, L, L] are kept for the backward, which turns them into the
//! scores' gradient in place. Blocks run in parallel on rayon's pool, each product a single-threaded
//! GEMM of the `gemm` crate (its kernels chosen at run time for the CPU).

use super::gemm::Operand;
use rayon::prelude::*;

/// Query and key positions per block.
const BLOCK: usize = 64;

/// Head counts and width of the packed buffers: queries [T, hq, d], keys and values [T, hkv, d].
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub hq: usize,
    pub hkv: usize,
    pub d: usize,
}

/// One segment of a packed row: its first position and its length.
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    pub start: usize,
    pub len: usize,
}

/// A raw pointer the parallel blocks share; each block writes a region no other block touches.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: the blocks of a phase write disjoint regions (see each use) and read what no block of
// that phase writes.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// The pointer (a method, so closures capture the whole `Shared`, not its field).
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// `dst (+)= lhs rhs` on the calling thread (each block is one task of rayon's pool), the operands
/// as (pointer, (row stride, column stride)).
///
/// # Safety
/// As [`super::gemm::product`].
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    dims: (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    add: bool,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
) {
    let (lhs, rhs) = (Operand { ptr: lhs, rs: lhs_rs, cs: lhs_cs }, Operand { ptr: rhs, rs: rhs_rs, cs: rhs_cs });
    super::gemm::product(dims, dst, dst_rs, add, lhs, rhs, 1.0, 1)
}

/// The blocks of a segment of `len` positions: (first position, positions) each.
fn blocks(len: usize) -> Vec<(usize, usize)> {
    (0..len.div_ceil(BLOCK)).map(|b| (b * BLOCK, BLOCK.min(len - b * BLOCK))).collect()
}

/// (head, query block) pairs, the largest blocks (the last ones, which see the most keys) first.
fn head_blocks(heads: usize, nb: usize) -> Vec<(usize, usize)> {
    (0..nb).rev().flat_map(|b| (0..heads).map(move |h| (h, b))).collect()
}

/// The forward of segment `s`: its rows of `y` [T, hq * d] (every head) and its probabilities
/// [hq, len, len], returned; what lies above the diagonal blocks is left unwritten and never read.
/// With a sliding `window` each query sees only the last `window` keys up to itself (the ones
/// before get probability zero, so the backward needs nothing more). With `sinks` (one logit per
/// query head) each row's denominator has the head's sink too; the backward is unchanged (a sink
/// has no value, so it adds nothing to `rowsum(P * dP)`), and the sinks themselves get no gradient.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: Heads,
    s: Segment,
    scale: f32,
    window: Option<usize>,
    sinks: Option<&[f32]>,
    y: &mut [f32],
) -> Vec<f32> {
    let Heads { hq, hkv, d } = dims;
    let (len, group) = (s.len, hq / hkv);
    let (rq, rk) = (hq * d, hkv * d);
    assert!(q.len() >= (s.start + len) * rq && k.len() >= (s.start + len) * rk && v.len() == k.len());
    assert!(y.len() >= (s.start + len) * rq, "y holds the segment's rows");
    // Not zero-filled (9 MB a layer at SmolLM2 shapes): every entry the backward reads is written
    // below, the keys after a query inside its block as zeros.
    let mut probs = super::output_buffer(hq * len * len);
    let (p, out) = (Shared(probs.as_mut_ptr()), Shared(y.as_mut_ptr()));
    let bl = blocks(len);
    head_blocks(hq, bl.len()).into_par_iter().for_each(|(h, b)| {
        let (r0, m) = bl[b];
        let keys = r0 + m; // keys 0..keys are visible from this block's queries
        let g = h / group;
        // SAFETY: block (h, b) writes rows r0..r0+m of head h's probabilities and of y's head h
        // columns: no other block writes them. Reads stay inside q, k, v (asserted above).
        unsafe {
            let ph = p.at(h * len * len + r0 * len);
            let qh = q.as_ptr().add((s.start + r0) * rq + h * d);
            let kg = k.as_ptr().add(s.start * rk + g * d);
            // Scores: the block's queries against every visible key (keys transposed: strides swapped).
            product((m, keys, d), ph, len, false, qh, (rq, 1), kg, (1, rk));
            for r in 0..m {
                let row = std::slice::from_raw_parts_mut(ph.add(r * len), keys);
                let (seen, masked) = row.split_at_mut(r0 + r + 1);
                let first = window.map_or(0, |w| (r0 + r + 1).saturating_sub(w));
                seen[..first].fill(0.0); // keys before the window
                match sinks {
                    Some(sinks) => super::softmax::softmax_with_sink_in_place(&mut seen[first..], scale, sinks[h]),
                    None => super::softmax::softmax_in_place(&mut seen[first..], scale),
                }
                masked.fill(0.0); // the keys after the query inside its block (later blocks: never written)
            }
            let vg = v.as_ptr().add(s.start * rk + g * d);
            let yh = out.at((s.start + r0) * rq + h * d);
            product((m, d, keys), yh, rq, false, ph, (len, 1), vg, (rk, 1));
        }
    });
    probs
}

/// The backward of segment `s` from its probabilities (consumed: they become the scores'
/// gradient) and `dy` [T, hq * d]: its rows of `dq` [T, hq, d], `dk` and `dv` [T, hkv, d], the
/// heads that share a key/value head summed.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    (q, k, v): (&[f32], &[f32], &[f32]),
    dy: &[f32],
    mut probs: Vec<f32>,
    dims: Heads,
    s: Segment,
    scale: f32,
    (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
) {
    let Heads { hq, hkv, d } = dims;
    let (len, group) = (s.len, hq / hkv);
    let (rq, rk) = (hq * d, hkv * d);
    assert_eq!(probs.len(), hq * len * len, "the segment's probabilities");
    assert!(dy.len() >= (s.start + len) * rq && dq.len() >= (s.start + len) * rq);
    assert!(q.len() >= (s.start + len) * rq && k.len() >= (s.start + len) * rk && v.len() == k.len());
    assert!(dk.len() >= (s.start + len) * rk && dv.len() == dk.len());
    let bl = blocks(len);
    let p = Shared(probs.as_mut_ptr());
    // The gradient of one key/value head's rows of key block b: the sum over the query heads of its
    // group of `lhs_h^T` (rows from the block on, its columns) times `x_h`'s rows from the block on.
    let key_block = |out: Shared, x: &[f32], (g, b): (usize, usize)| {
        let (c0, m) = bl[b];
        for (i, h) in (g * group..(g + 1) * group).enumerate() {
            // SAFETY: block (g, b) writes rows c0..c0+m of `out`'s head g; reads the probabilities
            // (or scores' gradient) of heads in group g, which this phase does not write.
            unsafe {
                let lhs = p.at(h * len * len + c0 * len + c0);
                let xh = x.as_ptr().add((s.start + c0) * rq + h * d);
                let dst = out.at((s.start + c0) * rk + g * d);
                product((m, d, len - c0), dst, rk, i > 0, lhs, (1, len), xh, (rq, 1));
            }
        }
    };
    let kv_blocks: Vec<(usize, usize)> = (0..bl.len()).flat_map(|b| (0..hkv).map(move |g| (g, b))).collect();
    // dV = P^T dY.
    let dv_ptr = Shared(dv.as_mut_ptr());
    kv_blocks.par_iter().for_each(|&gb| key_block(dv_ptr, dy, gb));
    // dP = dY V^T on the visible blocks, then dS = scale * P * (dP - rowsum(P * dP)) in place of P,
    // then dQ = dS K.
    let dq_ptr = Shared(dq.as_mut_ptr());
    head_blocks(hq, bl.len()).into_par_iter().for_each(|(h, b)| {
        let (r0, m) = bl[b];
        let keys = r0 + m;
        let g = h / group;
        let mut dp = vec![0f32; m * keys];
        // SAFETY: block (h, b) writes rows r0..r0+m of head h's probabilities and of dq's head h;
        // no other block touches them.
        unsafe {
            let dyh = dy.as_ptr().add((s.start + r0) * rq + h * d);
            let vg = v.as_ptr().add(s.start * rk + g * d);
            product((m, keys, d), dp.as_mut_ptr(), keys, false, dyh, (rq, 1), vg, (1, rk));
            let ph = p.at(h * len * len + r0 * len);
            for r in 0..m {
                let seen = r0 + r + 1;
                let prow = std::slice::from_raw_parts_mut(ph.add(r * len), seen);
                let grow = &dp[r * keys..r * keys + seen];
                let dot: f32 = prow.iter().zip(grow).map(|(a, b)| a * b).sum();
                for (pv, gv) in prow.iter_mut().zip(grow) {
                    *pv = scale * *pv * (gv - dot);
                }
            }
            let kg = k.as_ptr().add(s.start * rk + g * d);
            let dqh = dq_ptr.at((s.start + r0) * rq + h * d);
            product((m, d, keys), dqh, rq, false, ph, (len, 1), kg, (rk, 1));
        }
    });
    // dK = dS^T Q.
    let dk_ptr = Shared(dk.as_mut_ptr());
    kv_blocks.par_iter().for_each(|&gb| key_block(dk_ptr, q, gb));
    drop(probs);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain causal attention of one segment, head by head, in f64, each query seeing the keys from
    /// `first(i)` to itself.
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dims: Heads,
        len: usize,
        scale: f32,
        first: impl Fn(usize) -> usize,
    ) -> Vec<f64> {
        let Heads { hq, hkv, d } = dims;
        let mut y = vec![0f64; len * hq * d];
        for h in 0..hq {
            let g = h / (hq / hkv);
            for i in 0..len {
                let s: Vec<f64> = (first(i)..=i)
                    .map(|j| (0..d).map(|c| q[(i * hq + h) * d + c] as f64 * k[(j * hkv + g) * d + c] as f64).sum())
                    .map(|x: f64| x * scale as f64)
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..d {
                    y[(i * hq + h) * d + c] =
                        (first(i)..=i).zip(&e).map(|(j, e)| e / z * v[(j * hkv + g) * d + c] as f64).sum();
                }
            }
        }
        y
    }

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::split::SplitMix64::new(seed);
        (0..n).map(|_| (r.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0).collect()
    }

    #[test]
    fn blocked_forward_matches_plain_attention_across_block_edges() {
        // 150 positions: two full blocks and a partial one; grouped-query heads (4 over 2).
        let dims = Heads { hq: 4, hkv: 2, d: 8 };
        let len = 150;
        let (q, k, v) = (rand(len * 32, 1), rand(len * 16, 2), rand(len * 16, 3));
        let mut y = vec![0f32; len * 32];
        let probs = forward(&q, &k, &v, dims, Segment { start: 0, len }, 0.35, None, None, &mut y);
        let want = reference(&q, &k, &v, dims, len, 0.35, |_| 0);
        let d = y.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
        assert!(d < 1e-5, "outputs differ by {d}");
        // Each query's probabilities sum to one over the keys it sees, and are zero after it.
        for h in 0..4 {
            for i in 0..len {
                let row = &probs[(h * len + i) * len..(h * len + i + 1) * len];
                assert!((row[..=i].iter().sum::<f32>() - 1.0).abs() < 1e-5);
                let block_end = ((i / BLOCK + 1) * BLOCK).min(len);
                assert!(row[i + 1..block_end].iter().all(|&x| x == 0.0));
            }
        }
    }

    #[test]
    fn a_sliding_window_hides_the_keys_before_it_across_block_edges() {
        let dims = Heads { hq: 2, hkv: 1, d: 8 };
        let len = 140;
        let (q, k, v) = (rand(len * 16, 4), rand(len * 8, 5), rand(len * 8, 6));
        let mut y = vec![0f32; len * 16];
        forward(&q, &k, &v, dims, Segment { start: 0, len }, 0.4, Some(70), None, &mut y);
        let want = reference(&q, &k, &v, dims, len, 0.4, |i| (i + 1).saturating_sub(70));
        let d = y.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
        assert!(d < 1e-5, "outputs differ by {d}");
    }
}
