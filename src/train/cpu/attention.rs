//! Causal attention of one packed segment on the CPU in memory linear in its length (flash
//! attention's scheme): the forward runs over tiles of keys with a running maximum and sum per
//! query and keeps only the output and each query's log-sum-exp; the backward recomputes each
//! tile's probabilities from them. Blocks above the diagonal (and before a sliding window) are
//! skipped. Queries, keys, values and their gradients are read and written in place in the packed
//! [T, heads, head_dim] buffers (no repeated key/value heads for grouped-query attention); the
//! forward alone reads a transposed copy of the keys, made once per segment. Tiles run in parallel
//! on rayon's pool, each product a single-threaded GEMM of the `gemm` crate (its kernels chosen at
//! run time for the CPU).

use super::gemm::Operand;
use super::SharedMut;
use rayon::prelude::*;
use std::sync::Mutex;

/// Query positions per forward task, and key positions per backward block.
const BLOCK: usize = 64;
/// Key positions per forward tile: a segment this short is one tile, whose softmax is the plain one.
const KEY_TILE: usize = 512;
/// Query positions per backward tile.
const QUERY_TILE: usize = 256;

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

/// How a query's products with the keys become its logits, and which keys it sees.
#[derive(Debug, Clone, Copy)]
pub struct Logits<'a> {
    /// Logits are `q.k * scale` ...
    pub scale: f32,
    /// ... or, soft-capped, `c * tanh(q.k * scale / c)`.
    pub softcap: Option<f32>,
    /// Each query sees only the last `window` keys up to itself.
    pub window: Option<usize>,
    /// One logit per query head in every softmax's denominator (attention sinks; no value, no
    /// gradient).
    pub sinks: Option<&'a [f32]>,
}

impl Logits<'_> {
    /// The first key query `i` sees.
    fn first_key(&self, i: usize) -> usize {
        self.window.map_or(0, |w| (i + 1).saturating_sub(w))
    }

    /// The keys of the tile [c0, c0 + n) query `i` sees, as a range inside the tile.
    fn visible(&self, i: usize, c0: usize, n: usize) -> std::ops::Range<usize> {
        let lo = self.first_key(i).max(c0) - c0;
        let hi = (i + 1).min(c0 + n).saturating_sub(c0);
        lo..hi.max(lo)
    }

    /// Raw products of a row into what the exponentials take: soft-capped in place (then scaled by
    /// 1), or left to be scaled by `scale`. The scale to pass on is returned. With `slope` (the
    /// backward, soft-capped), each logit's derivative by its product, `scale * (1 - tanh^2)`.
    fn prepare(&self, row: &mut [f32], slope: Option<&mut [f32]>) -> f32 {
        let Some(c) = self.softcap else { return self.scale };
        match slope {
            Some(slope) => row.iter_mut().zip(slope).for_each(|(x, sl)| {
                let t = (*x * self.scale / c).tanh();
                *sl = self.scale * (1.0 - t * t);
                *x = c * t;
            }),
            None => row.iter_mut().for_each(|x| *x = c * (*x * self.scale / c).tanh()),
        }
        1.0
    }
}

/// `dst (+)= lhs rhs` on the calling thread (each tile is one task of rayon's pool), the operands
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

/// Tiles of `size` positions from `from` to `to`: (first position, positions) each.
fn tiles(from: usize, to: usize, size: usize) -> impl DoubleEndedIterator<Item = (usize, usize)> {
    (from..to).step_by(size).map(move |a| (a, size.min(to - a)))
}

/// The forward of segment `s`: its rows of `y` [T, hq * d] (every head), and the log-sum-exp of
/// each query's logits [hq, len] (the sink's included), returned for the backward.
#[allow(clippy::too_many_arguments)]
pub fn forward(q: &[f32], k: &[f32], v: &[f32], dims: Heads, s: Segment, logits: Logits, y: &mut [f32]) -> Vec<f32> {
    let Heads { hq, hkv, d } = dims;
    let (len, group) = (s.len, hq / hkv);
    let (rq, rk) = (hq * d, hkv * d);
    assert!(q.len() >= (s.start + len) * rq && k.len() >= (s.start + len) * rk && v.len() == k.len());
    assert!(y.len() >= (s.start + len) * rq, "y holds the segment's rows");
    let mut lse = vec![0f32; hq * len];
    let (out, lse_out) = (SharedMut::new(y.as_mut_ptr()), SharedMut::new(lse.as_mut_ptr()));
    let (kt, kt_rs) = keys_transposed(k, dims, s);
    // (head, query block) pairs, the last blocks (which see the most keys) first.
    let tasks: Vec<(usize, (usize, usize))> =
        tiles(0, len, BLOCK).rev().flat_map(|(r0, m)| (0..hq).map(move |h| (h, (r0, m)))).collect();
    tasks.into_par_iter().for_each(|(h, (r0, m))| {
        let g = h / group;
        let (mut max, mut sum) = (vec![f32::NEG_INFINITY; m], vec![0f32; m]);
        // Written by the scores' product before it is read.
        let mut tile = super::output_buffer(m * KEY_TILE.min(r0 + m));
        // SAFETY: task (h, r0) writes rows r0..r0+m of y's head h columns and of head h's
        // log-sum-exp: no other task writes them. Reads stay inside q, k, v (asserted above) and
        // the keys' copy (its rows' first `len` values, all written).
        unsafe {
            let qh = q.as_ptr().add((s.start + r0) * rq + h * d);
            let yh = out.at((s.start + r0) * rq + h * d);
            for (t, (c0, n)) in tiles(logits.first_key(r0), r0 + m, KEY_TILE).enumerate() {
                let kc = kt.as_ptr().add(g * d * kt_rs + c0);
                product((m, n, d), tile.as_mut_ptr(), n, false, qh, (rq, 1), kc, (kt_rs, 1));
                for r in 0..m {
                    let row = &mut tile[r * n..(r + 1) * n];
                    let vis = logits.visible(r0 + r, c0, n);
                    let (before, rest) = row.split_at_mut(vis.start);
                    let (seen, after) = rest.split_at_mut(vis.len());
                    before.fill(0.0);
                    after.fill(0.0);
                    if seen.is_empty() {
                        continue;
                    }
                    let scale = logits.prepare(seen, None);
                    let new_max = max[r].max(super::softmax::max_scaled(seen, scale));
                    let (tile_sum, _) = super::softmax::exp_sums_in_place(seen, scale, new_max, false);
                    // The sums and outputs so far, rescaled to the new maximum (none before: 0).
                    let alpha = if max[r] == f32::NEG_INFINITY { 0.0 } else { (max[r] - new_max).exp() };
                    (max[r], sum[r]) = (new_max, sum[r] * alpha + tile_sum);
                    if t > 0 && alpha != 1.0 {
                        std::slice::from_raw_parts_mut(yh.add(r * rq), d).iter_mut().for_each(|x| *x *= alpha);
                    }
                }
                let vc = v.as_ptr().add((s.start + c0) * rk + g * d);
                product((m, d, n), yh, rq, t > 0, tile.as_ptr(), (n, 1), vc, (rk, 1));
            }
            for r in 0..m {
                // With a sink, one more term in the denominator, on the same maximum.
                let (top, total) = match logits.sinks {
                    Some(sinks) => {
                        let top = max[r].max(sinks[h]);
                        (top, sum[r] * (max[r] - top).exp() + (sinks[h] - top).exp())
                    }
                    None => (max[r], sum[r]),
                };
                let factor = (max[r] - top).exp() / total;
                std::slice::from_raw_parts_mut(yh.add(r * rq), d).iter_mut().for_each(|x| *x *= factor);
                *lse_out.at(h * len + r0 + r) = top + total.ln();
            }
        }
    });
    lse
}

/// The segment's keys transposed, [hkv, d, row stride] (each head's rows, one per dimension, the
/// keys along them), and that row stride. The scores' product then reads its key block as it is;
/// from [T, hkv, d] the GEMM gathered the block one float at a time for every query block, at long
/// rows from L3 (one layer's forward at 8,192 tokens: 0.63 s with the gathers, 0.39-0.45 s
/// without; benches/RESULTS.md). Rows are padded so that they do not lie a multiple of 2 KB apart
/// (the same few L1 sets for every row).
fn keys_transposed(k: &[f32], dims: Heads, s: Segment) -> (Vec<f32>, usize) {
    let Heads { hkv, d, .. } = dims;
    let rk = hkv * d;
    let stride = s.len.next_multiple_of(16) + 16;
    let mut kt = super::output_buffer(hkv * d * stride);
    kt.par_chunks_mut(d * stride).enumerate().for_each(|(g, head)| {
        // Sixteen keys at a time: their rows of K stay in L1 while each dimension's run is written.
        for j0 in (0..s.len).step_by(16) {
            let keys = j0..(j0 + 16).min(s.len);
            for (c, row) in head.chunks_mut(stride).enumerate() {
                for j in keys.clone() {
                    row[j] = k[(s.start + j) * rk + g * d + c];
                }
            }
        }
    });
    (kt, stride)
}

/// The backward of segment `s` from its outputs `y`, their gradient `dy` [T, hq * d] and the
/// forward's log-sum-exp [hq, len]: adds its rows of `dq` [T, hq, d], `dk` and `dv` [T, hkv, d]
/// (the heads that share a key/value head summed).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    (q, k, v): (&[f32], &[f32], &[f32]),
    (y, dy): (&[f32], &[f32]),
    lse: &[f32],
    dims: Heads,
    s: Segment,
    logits: Logits,
    (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
) {
    let Heads { hq, hkv, d } = dims;
    let (len, group) = (s.len, hq / hkv);
    let (rq, rk) = (hq * d, hkv * d);
    assert_eq!(lse.len(), hq * len, "the segment's log-sum-exp");
    assert!(dy.len() >= (s.start + len) * rq && y.len() == dy.len() && dq.len() >= (s.start + len) * rq);
    assert!(q.len() >= (s.start + len) * rq && k.len() >= (s.start + len) * rk && v.len() == k.len());
    assert!(dk.len() >= (s.start + len) * rk && dv.len() == dk.len());
    // D = rowsum(dY * Y) per head and query: the `rowsum(P * dP)` of the softmax's backward.
    let mut rowsums = vec![0f32; hq * len];
    rowsums.par_chunks_mut(len).enumerate().for_each(|(h, out)| {
        for (i, o) in out.iter_mut().enumerate() {
            let at = (s.start + i) * rq + h * d;
            *o = super::reduce::dot(&y[at..at + d], &dy[at..at + d]);
        }
    });
    let sums = Mutex::new((dq, dk, dv));
    // Each task: one query head and a run of key blocks, its gradients private, added at the end.
    let tasks: Vec<(usize, (usize, usize))> =
        key_runs(len, hq, logits.window).into_iter().flat_map(|run| (0..hq).map(move |h| (h, run))).collect();
    tasks.into_par_iter().for_each(|(h, (c_lo, c_hi))| {
        let g = h / group;
        let (mut gq, mut gk, mut gv) =
            (vec![0f32; (len - c_lo) * d], vec![0f32; (c_hi - c_lo) * d], vec![0f32; (c_hi - c_lo) * d]);
        // Written by their products before they are read.
        let (mut p, mut dp) = (super::output_buffer(QUERY_TILE * BLOCK), super::output_buffer(QUERY_TILE * BLOCK));
        let mut slope = vec![0f32; if logits.softcap.is_some() { QUERY_TILE * BLOCK } else { 0 }];
        let (lse_h, rowsums_h) = (&lse[h * len..(h + 1) * len], &rowsums[h * len..(h + 1) * len]);
        for (c0, n) in tiles(c_lo, c_hi, BLOCK) {
            // The query tiles that see these keys: from the block on, up to the window's end.
            let last_query = logits.window.map_or(len, |w| (c0 + n - 1 + w).min(len));
            for (r0, m) in tiles(c0, last_query, QUERY_TILE) {
                // SAFETY: reads stay inside q, k, v, dy (asserted above); writes go to this task's
                // own buffers, each product's destination sized for it.
                unsafe {
                    let qh = q.as_ptr().add((s.start + r0) * rq + h * d);
                    let kc = k.as_ptr().add((s.start + c0) * rk + g * d);
                    let vc = v.as_ptr().add((s.start + c0) * rk + g * d);
                    let dyh = dy.as_ptr().add((s.start + r0) * rq + h * d);
                    // P, recomputed from the log-sum-exp.
                    product((m, n, d), p.as_mut_ptr(), n, false, qh, (rq, 1), kc, (1, rk));
                    for r in 0..m {
                        let row = &mut p[r * n..(r + 1) * n];
                        let vis = logits.visible(r0 + r, c0, n);
                        let (before, rest) = row.split_at_mut(vis.start);
                        let (seen, after) = rest.split_at_mut(vis.len());
                        before.fill(0.0);
                        after.fill(0.0);
                        let slope = logits.softcap.map(|_| &mut slope[r * n..r * n + seen.len()]);
                        let scale = logits.prepare(seen, slope);
                        super::softmax::exp_sums_in_place(seen, scale, lse_h[r0 + r], false);
                    }
                    // dV += P^T dY.
                    product((n, d, m), gv.as_mut_ptr().add((c0 - c_lo) * d), d, true, p.as_ptr(), (1, n), dyh, (rq, 1));
                    // dP = dY V^T, then dS = P * (dP - D) * (d logit / d product), in place of P.
                    product((m, n, d), dp.as_mut_ptr(), n, false, dyh, (rq, 1), vc, (1, rk));
                    for r in 0..m {
                        let vis = logits.visible(r0 + r, c0, n);
                        // The visible keys as slices, so that the loops are vectorised.
                        let (pr, gr, dsum) =
                            (&mut p[r * n + vis.start..r * n + vis.end], &dp[r * n + vis.start..], rowsums_h[r0 + r]);
                        let ds = pr.iter_mut().zip(gr);
                        match logits.softcap {
                            Some(_) => ds.zip(&slope[r * n..]).for_each(|((p, g), sl)| *p *= (g - dsum) * sl),
                            None => ds.for_each(|(p, g)| *p *= (g - dsum) * logits.scale),
                        }
                    }
                    // dK += dS^T Q, dQ += dS K.
                    product((n, d, m), gk.as_mut_ptr().add((c0 - c_lo) * d), d, true, p.as_ptr(), (1, n), qh, (rq, 1));
                    product((m, d, n), gq.as_mut_ptr().add((r0 - c_lo) * d), d, true, p.as_ptr(), (n, 1), kc, (rk, 1));
                }
            }
        }
        let mut sums = sums.lock().expect("not poisoned");
        let (dq, dk, dv) = &mut *sums;
        let add = |dst: &mut [f32], stride: usize, col: usize, first: usize, src: &[f32]| {
            for (i, row) in src.chunks(d).enumerate() {
                let at = (s.start + first + i) * stride + col * d;
                dst[at..at + d].iter_mut().zip(row).for_each(|(a, b)| *a += b);
            }
        };
        add(dq, rq, h, c_lo, &gq);
        add(dk, rk, g, c_lo, &gk);
        add(dv, rk, g, c_lo, &gv);
    });
}

/// The key positions of a segment split into runs of whole blocks, each run about as much work
/// (the queries that see its keys), enough runs per head to keep every thread busy.
fn key_runs(len: usize, hq: usize, window: Option<usize>) -> Vec<(usize, usize)> {
    let blocks: Vec<(usize, usize)> = tiles(0, len, BLOCK).collect();
    let work = |&(c0, n): &(usize, usize)| window.map_or(len, |w| (c0 + n - 1 + w).min(len)) - c0;
    let runs = (8 * rayon::current_num_threads()).div_ceil(hq).clamp(1, blocks.len().max(1));
    let total: usize = blocks.iter().map(work).sum();
    let (mut out, mut start, mut done) = (Vec::new(), 0, 0);
    for b in &blocks {
        done += work(b);
        if done * runs >= total * (out.len() + 1) || b.0 + b.1 == len {
            out.push((start, b.0 + b.1));
            start = b.0 + b.1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain attention of one segment, head by head, in f64: each query sees the keys from
    /// `first(i)` to itself, logits soft-capped when `cap`, a sink per head when given. Returns the
    /// outputs and the gradients of `sum(y * dy)` for q, k, v.
    #[allow(clippy::type_complexity)]
    fn reference(
        (q, k, v, dy): (&[f32], &[f32], &[f32], &[f32]),
        dims: Heads,
        len: usize,
        lg: Logits,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let Heads { hq, hkv, d } = dims;
        let (mut y, mut dq, mut dk, mut dv) =
            (vec![0f64; len * hq * d], vec![0f64; len * hq * d], vec![0f64; len * hkv * d], vec![0f64; len * hkv * d]);
        let (qa, ka) = (
            |i: usize, h: usize, c: usize| q[(i * hq + h) * d + c] as f64,
            |j: usize, g: usize, c: usize| k[(j * hkv + g) * d + c] as f64,
        );
        for h in 0..hq {
            let g = h / (hq / hkv);
            for i in 0..len {
                let keys: Vec<usize> = (lg.first_key(i)..=i).collect();
                let raw: Vec<f64> =
                    keys.iter().map(|&j| (0..d).map(|c| qa(i, h, c) * ka(j, g, c)).sum::<f64>()).collect();
                let sc = lg.scale as f64;
                let (logit, slope): (Vec<f64>, Vec<f64>) = match lg.softcap {
                    Some(c) => raw
                        .iter()
                        .map(|x| {
                            ((c as f64) * (x * sc / c as f64).tanh(), sc * (1.0 - (x * sc / c as f64).tanh().powi(2)))
                        })
                        .unzip(),
                    None => raw.iter().map(|x| (x * sc, sc)).unzip(),
                };
                let sink = lg.sinks.map(|s| s[h] as f64);
                let top = logit.iter().cloned().chain(sink).fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = logit.iter().map(|x| (x - top).exp()).sum::<f64>() + sink.map_or(0.0, |s| (s - top).exp());
                let p: Vec<f64> = logit.iter().map(|x| (x - top).exp() / z).collect();
                let at = |c| (i * hq + h) * d + c;
                for c in 0..d {
                    y[at(c)] = keys.iter().zip(&p).map(|(&j, p)| p * v[(j * hkv + g) * d + c] as f64).sum();
                }
                let dp: Vec<f64> = keys
                    .iter()
                    .map(|&j| (0..d).map(|c| dy[at(c)] as f64 * v[(j * hkv + g) * d + c] as f64).sum())
                    .collect();
                let dot: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for (x, &j) in keys.iter().enumerate() {
                    let ds = p[x] * (dp[x] - dot) * slope[x];
                    for c in 0..d {
                        dv[(j * hkv + g) * d + c] += p[x] * dy[at(c)] as f64;
                        dq[at(c)] += ds * ka(j, g, c);
                        dk[(j * hkv + g) * d + c] += ds * qa(i, h, c);
                    }
                }
            }
        }
        (y, dq, dk, dv)
    }

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::split::SplitMix64::new(seed);
        (0..n).map(|_| (r.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0).collect()
    }

    fn max_diff(a: &[f32], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max)
    }

    /// Forward and backward of one segment placed after `offset` other positions, against the
    /// reference.
    fn check(dims: Heads, len: usize, offset: usize, lg: Logits, seed: u64) {
        let Heads { hq, hkv, d } = dims;
        let t = offset + len;
        let (q, k, v, dy) = (
            rand(t * hq * d, seed),
            rand(t * hkv * d, seed + 1),
            rand(t * hkv * d, seed + 2),
            rand(t * hq * d, seed + 3),
        );
        let seg = Segment { start: offset, len };
        let mut y = vec![0f32; t * hq * d];
        let lse = forward(&q, &k, &v, dims, seg, lg, &mut y);
        let (mut dq, mut dk, mut dv) = (vec![0f32; t * hq * d], vec![0f32; t * hkv * d], vec![0f32; t * hkv * d]);
        backward((&q, &k, &v), (&y, &dy), &lse, dims, seg, lg, (&mut dq, &mut dk, &mut dv));
        let slice = |x: &[f32], w: usize| x[offset * w..].to_vec();
        let (sq, skv) = (hq * d, hkv * d);
        let want = reference((&slice(&q, sq), &slice(&k, skv), &slice(&v, skv), &slice(&dy, sq)), dims, len, lg);
        for (got, want, what) in [
            (slice(&y, sq), &want.0, "y"),
            (slice(&dq, sq), &want.1, "dq"),
            (slice(&dk, skv), &want.2, "dk"),
            (slice(&dv, skv), &want.3, "dv"),
        ] {
            let diff = max_diff(&got, want);
            assert!(diff < 2e-5, "{what} differs by {diff} (len {len}, {lg:?})");
        }
        // The rows before the segment are not touched.
        assert!(y[..offset * sq].iter().chain(&dq[..offset * sq]).chain(&dk[..offset * skv]).all(|&x| x == 0.0));
    }

    const PLAIN: Logits = Logits { scale: 0.35, softcap: None, window: None, sinks: None };

    #[test]
    fn tiled_attention_matches_plain_attention_across_tile_edges() {
        // Inside one block; across block edges with a partial last block; across key tiles (the
        // running maximum rescales earlier tiles). Grouped-query heads (4 over 2), after an offset.
        let dims = Heads { hq: 4, hkv: 2, d: 8 };
        for (len, offset) in [(5, 0), (150, 3), (1100, 0)] {
            check(dims, len, offset, PLAIN, len as u64);
        }
    }

    #[test]
    fn windows_soft_caps_and_sinks_match_plain_attention() {
        let dims = Heads { hq: 2, hkv: 1, d: 8 };
        let sinks = [0.7f32, -1.5];
        for window in [None, Some(70), Some(600)] {
            for softcap in [None, Some(0.8)] {
                for sinks in [None, Some(&sinks[..])] {
                    let lg = Logits { scale: 0.4, softcap, window, sinks };
                    check(dims, 700, 2, lg, 40);
                }
            }
        }
    }

    #[test]
    fn key_runs_cover_the_segment_in_whole_blocks() {
        for (len, hq, window) in [(1, 8, None), (64, 1, None), (5000, 3, None), (5000, 2, Some(300))] {
            let runs = key_runs(len, hq, window);
            assert_eq!(runs.first().unwrap().0, 0);
            assert_eq!(runs.last().unwrap().1, len);
            assert!(runs.windows(2).all(|w| w[0].1 == w[1].0 && w[0].1 % BLOCK == 0));
        }
    }
}
