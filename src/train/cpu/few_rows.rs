//! `y = x W^T` for a few rows of x (decoding: one row per live sequence) with W [n, k] row-major, as
//! n dot products of contiguous rows, spread over the threads by blocks of W's rows. Each element
//! of W is read once per call and nothing is packed or allocated besides y; a GEMM instead packs
//! all of W first, which for a 32k x 256 vocabulary projection costs more than the product.

use rayon::prelude::*;

/// At most this many rows go through the dot-product kernel; more go to the GEMM.
pub const MAX_ROWS: usize = 16;

/// Products of fewer multiply-adds than this run on the calling thread (up to ~70 us of work: below
/// it, measured by `cargo bench --bench kernels`, the hand-off to the pool cost more than it saved).
const SERIAL_MACS: usize = 1 << 21;

/// Dot products of one row of W with four rows of x at once: four independent 8-lane accumulators,
/// so that the multiply-adds do not wait on each other, and W's row read once for the four (the sums
/// are reassociated across lanes: results differ from a sequential dot product in the last bits).
#[inline(always)]
fn dot4(x: [&[f32]; 4], w: &[f32]) -> [f32; 4] {
    let mut acc = [[0f32; 8]; 4];
    let k8 = w.len() / 8 * 8;
    let mut c = 0;
    while c < k8 {
        let wv = &w[c..c + 8];
        for (a, xr) in acc.iter_mut().zip(&x) {
            let xv = &xr[c..c + 8];
            for l in 0..8 {
                a[l] += xv[l] * wv[l];
            }
        }
        c += 8;
    }
    let mut out = [0f32; 4];
    for ((o, a), xr) in out.iter_mut().zip(&acc).zip(&x) {
        let mut s = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
        for t in k8..w.len() {
            s += xr[t] * w[t];
        }
        *o = s;
    }
    out
}

/// Rows `n0..` of W (as many as `out` holds for m rows of x) into the tile `out` [m, rows].
#[inline(always)]
fn block(x: &[f32], m: usize, k: usize, w: &[f32], n0: usize, out: &mut [f32]) {
    let rows = out.len() / m.max(1);
    let row = |i: usize| &x[i.min(m - 1) * k..(i.min(m - 1) + 1) * k];
    for j in 0..rows {
        let wr = &w[(n0 + j) * k..(n0 + j + 1) * k];
        for i in (0..m).step_by(4) {
            // A short last group repeats the last row; its extra results are dropped.
            let d = dot4([row(i), row(i + 1), row(i + 2), row(i + 3)], wr);
            for (t, v) in d.iter().enumerate().take(m - i) {
                out[(i + t) * rows + j] = *v;
            }
        }
    }
}

/// `block` with AVX2 + FMA intrinsics: a register tile of two rows of W against four rows of x (eight
/// accumulators; six loads per eight multiply-adds, where one row of W against eight rows of x took
/// nine), the eight sums reduced together by horizontal adds into one vector. A short last group of
/// x repeats its last row; an odd last row of W goes alone.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2(x: &[f32], m: usize, k: usize, w: &[f32], n0: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let rows = out.len() / m.max(1);
    let k8 = k / 8 * 8;
    let xrow = |i: usize| x.as_ptr().add(i.min(m - 1) * k);
    let mut j = 0;
    while j < rows {
        let pair = rows - j >= 2;
        let w0 = w.as_ptr().add((n0 + j) * k);
        let w1 = if pair { w0.add(k) } else { w0 };
        for i0 in (0..m).step_by(4) {
            let xs = [xrow(i0), xrow(i0 + 1), xrow(i0 + 2), xrow(i0 + 3)];
            let mut a = [_mm256_setzero_ps(); 8];
            let mut c = 0;
            while c < k8 {
                let (v0, v1) = (_mm256_loadu_ps(w0.add(c)), _mm256_loadu_ps(w1.add(c)));
                for (t, xp) in xs.iter().enumerate() {
                    let xv = _mm256_loadu_ps(xp.add(c));
                    a[t] = _mm256_fmadd_ps(xv, v0, a[t]);
                    a[4 + t] = _mm256_fmadd_ps(xv, v1, a[4 + t]);
                }
                c += 8;
            }
            // Lane l of the reduced vector is the sum of accumulator l.
            let h03 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
            let h47 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
            let sums = _mm256_add_ps(_mm256_permute2f128_ps(h03, h47, 0x20), _mm256_permute2f128_ps(h03, h47, 0x31));
            let mut s = [0f32; 8];
            _mm256_storeu_ps(s.as_mut_ptr(), sums);
            for (t, xp) in xs.iter().enumerate().take(m - i0) {
                for (r, wp) in [w0, w1].iter().enumerate().take(1 + pair as usize) {
                    let mut v = s[4 * r + t];
                    for q in k8..k {
                        v += *xp.add(q) * *wp.add(q);
                    }
                    out[(i0 + t) * rows + j + r] = v;
                }
            }
        }
        j += 1 + pair as usize;
    }
}

/// `x W^T` for tensors, when x has at most [`MAX_ROWS`] rows and both are contiguous f32 on the CPU;
/// None otherwise (the caller takes the general path).
pub fn linear(x: &candle_core::Tensor, w: &candle_core::Tensor) -> candle_core::Result<Option<candle_core::Tensor>> {
    with_cpu_f32(x, w, |xs, (m, k), ws, n| (m <= MAX_ROWS).then(|| (matmul_t(xs, m, k, ws, n), (m, n))))
}

/// `x A^T` [t, r] for many rows x [t, k] and a low-rank A [r, k] (an adapter's first factor, r at
/// most [`MAX_ROWS`]), as `(A x^T)^T`: A's rows are the few rows. Through the GEMM, whose register
/// tiles are 16 rows of the r-wide output, the product of 512 tokens with a rank-8 A [8, 576] took
/// 120-130 us; this 70-75 (`cargo bench --bench kernels`, "LoRA's rank-8 products"). None where the
/// rank is larger or the tensors are not contiguous f32 on the CPU.
pub fn low_rank(x: &candle_core::Tensor, a: &candle_core::Tensor) -> candle_core::Result<Option<candle_core::Tensor>> {
    with_cpu_f32(x, a, |xs, (t, k), a_s, r| {
        (r <= MAX_ROWS && t > MAX_ROWS).then(|| {
            let ut = matmul_t(a_s, r, k, xs, t);
            let mut u = vec![0f32; t * r];
            for (i, row) in ut.chunks(t.max(1)).enumerate() {
                for (j, &v) in row.iter().enumerate() {
                    u[j * r + i] = v;
                }
            }
            (u, (t, r))
        })
    })
}

/// `f(x, (m, k), w, n)` over the f32 slices of x [m, k] and w [n, k] when both are contiguous f32
/// on the CPU; its result [rows, cols] becomes a tensor. None otherwise, or when `f` declines.
fn with_cpu_f32(
    x: &candle_core::Tensor,
    w: &candle_core::Tensor,
    f: impl FnOnce(&[f32], (usize, usize), &[f32], usize) -> Option<(Vec<f32>, (usize, usize))>,
) -> candle_core::Result<Option<candle_core::Tensor>> {
    use candle_core::{DType, Storage};
    let (Ok((m, k)), Ok((n, k2))) = (x.dims2(), w.dims2()) else { return Ok(None) };
    if k != k2 || !x.device().is_cpu() || x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        return Ok(None);
    }
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (Storage::Cpu(xc), Storage::Cpu(wc)) = (&*xs, &*ws) else { return Ok(None) };
    let (Some((x0, x1)), Some((w0, w1))) = (xl.contiguous_offsets(), wl.contiguous_offsets()) else {
        return Ok(None);
    };
    match f(&xc.as_slice::<f32>()?[x0..x1], (m, k), &wc.as_slice::<f32>()?[w0..w1], n) {
        Some((y, shape)) => Ok(Some(candle_core::Tensor::from_vec(y, shape, x.device())?)),
        None => Ok(None),
    }
}

/// `x` [m, k] times `w` [n, k] transposed: [m, n] row-major.
pub fn matmul_t(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    const BLOCK: usize = 64;
    let blocks = n.div_ceil(BLOCK);
    // Each block of W's rows fills its own [m, block] tile, gathered into [m, n] after.
    let tile = |b: usize| {
        let n0 = b * BLOCK;
        let rows = BLOCK.min(n - n0);
        let mut tile = vec![0f32; m * rows];
        #[cfg(target_arch = "x86_64")]
        if super::has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked at run time).
            unsafe { block_avx2(x, m, k, w, n0, &mut tile) };
            return tile;
        }
        block(x, m, k, w, n0, &mut tile);
        tile
    };
    // A small product (an adapter's, an attention projection's while decoding) costs less than
    // handing it to the thread pool and waking a worker for it: it runs on the calling thread.
    let tiles: Vec<Vec<f32>> = if m * n * k < SERIAL_MACS {
        (0..blocks).map(tile).collect()
    } else {
        (0..blocks).into_par_iter().map(tile).collect()
    };
    let mut y = vec![0f32; m * n];
    for (b, tile) in tiles.iter().enumerate() {
        let n0 = b * BLOCK;
        let rows = tile.len() / m.max(1);
        for i in 0..m {
            y[i * n + n0..i * n + n0 + rows].copy_from_slice(&tile[i * rows..(i + 1) * rows]);
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equals_the_naive_product() {
        // Every row count up to MAX_ROWS, tails in k (37, 64 + 3) and odd blocks of W's rows (151).
        let mut r = crate::split::SplitMix64::new(4);
        let mut v = |len: usize| -> Vec<f32> { (0..len).map(|_| r.uniform() as f32 - 0.5).collect() };
        for (m, k, n) in (1..=MAX_ROWS).map(|m| (m, 37, 151)).chain([(8, 67, 130), (5, 256, 64)]) {
            let (x, w) = (v(m * k), v(n * k));
            let y = matmul_t(&x, m, k, &w, n);
            for i in 0..m {
                for j in 0..n {
                    let want: f32 = (0..k).map(|t| x[i * k + t] * w[j * k + t]).sum();
                    assert!((y[i * n + j] - want).abs() < 1e-5, "m={m} ({i}, {j}): {} vs {want}", y[i * n + j]);
                }
            }
        }
    }

    #[test]
    fn low_rank_products_equal_the_naive_product() {
        let dev = candle_core::Device::Cpu;
        for (t, k, r) in [(17, 37, 8), (130, 67, 16), (64, 576, 1)] {
            let x: Vec<f32> = (0..t * k).map(|i| ((i as f32) * 0.37).sin()).collect();
            let a: Vec<f32> = (0..r * k).map(|i| ((i as f32) * 0.11).cos()).collect();
            let (xt, at) = (
                candle_core::Tensor::from_vec(x.clone(), (t, k), &dev).unwrap(),
                candle_core::Tensor::from_vec(a.clone(), (r, k), &dev).unwrap(),
            );
            let u: Vec<f32> =
                low_rank(&xt, &at).unwrap().expect("a low rank").flatten_all().unwrap().to_vec1().unwrap();
            for i in 0..t {
                for j in 0..r {
                    let want: f64 = (0..k).map(|c| x[i * k + c] as f64 * a[j * k + c] as f64).sum();
                    assert!(
                        (u[i * r + j] as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{t}x{k}x{r} at ({i}, {j})"
                    );
                }
            }
        }
        // A rank beyond the kernel's rows, or few tokens: the caller's general path.
        let (x, a) = (
            candle_core::Tensor::zeros((40, 8), candle_core::DType::F32, &dev).unwrap(),
            candle_core::Tensor::zeros((17, 8), candle_core::DType::F32, &dev).unwrap(),
        );
        assert!(low_rank(&x, &a).unwrap().is_none());
        assert!(low_rank(&x.narrow(0, 0, 4).unwrap(), &a.narrow(0, 0, 8).unwrap()).unwrap().is_none());
    }
}
