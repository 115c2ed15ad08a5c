//! Softmax statistics of one row of logits over a large vocabulary, one exponential per element:
//! the max, `sum exp(s x - m)` (and `sum exp(s x - m) * s x` for the entropy), and the
//! exponentials written out for a gradient. The exponential is Cephes' single-precision polynomial
//! (the one in avx_mathfun and most SIMD libraries, within 2 ulp of libm's `expf`), sixteen lanes
//! at a time with AVX-512 (a row's tail under a mask), eight with AVX2 + FMA; libm's `expf` element
//! by element elsewhere. Attention's probabilities and the loss head's vocabulary rows are where a
//! step computes its exponentials.

/// `max_j s * x_j`.
pub fn max_scaled(x: &[f32], s: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx512() {
        // SAFETY: the CPU has AVX-512 (checked at run time).
        return unsafe { avx512::max_scaled(x, s) };
    }
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked at run time).
        return unsafe { avx2::max_scaled(x, s) };
    }
    x.iter().map(|&v| v * s).fold(f32::NEG_INFINITY, f32::max)
}

/// `e_j = exp(s x_j - m)` into `out` (when given); returns `(sum_j e_j, sum_j e_j * s x_j)`, the
/// second only when `weighted` (0 otherwise).
pub fn exp_sums(x: &[f32], s: f32, m: f32, out: Option<&mut [f32]>, weighted: bool) -> (f32, f32) {
    let out = match out {
        Some(o) => {
            assert_eq!(o.len(), x.len(), "one output per element");
            o.as_mut_ptr()
        }
        None => std::ptr::null_mut(),
    };
    // SAFETY: x has x.len() elements and out, when given, as many (asserted).
    unsafe { exp_sums_raw(x.as_ptr(), out, x.len(), s, m, weighted) }
}

/// `x <- softmax(s x)` in place (an attention row).
pub fn softmax_in_place(x: &mut [f32], s: f32) {
    let m = max_scaled(x, s);
    let (sum, _) = exp_sums_in_place(x, s, m, false);
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// [`softmax_in_place`] with one more logit, `sink` (unscaled), in the denominator only: the
/// probabilities sum to less than 1 (gpt-oss's attention sinks).
pub fn softmax_with_sink_in_place(x: &mut [f32], s: f32, sink: f32) {
    let m = max_scaled(x, s).max(sink);
    let (sum, _) = exp_sums_in_place(x, s, m, false);
    let inv = 1.0 / (sum + (sink - m).exp());
    x.iter_mut().for_each(|v| *v *= inv);
}

/// `x_j <- exp(s x_j - m)`; returns the sums of [`exp_sums`] (of the exponentials, and weighted by
/// `s x_j` when `weighted`).
pub fn exp_sums_in_place(x: &mut [f32], s: f32, m: f32, weighted: bool) -> (f32, f32) {
    let (n, p) = (x.len(), x.as_mut_ptr());
    // SAFETY: p points at n elements, each read before it is written at the same index.
    unsafe { exp_sums_raw(p, p, n, s, m, weighted) }
}

/// [`exp_sums`] over `n` elements at `x`, the exponentials written at `out` (which may be `x` itself
/// or null).
///
/// # Safety
/// `x` must be valid for `n` reads and `out` (when not null) for `n` writes.
unsafe fn exp_sums_raw(x: *const f32, out: *mut f32, n: usize, s: f32, m: f32, weighted: bool) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx512() {
        // SAFETY: the CPU has AVX-512 (checked at run time); the caller's bounds hold.
        return unsafe { avx512::exp_sums(x, out, n, s, m, weighted) };
    }
    #[cfg(target_arch = "x86_64")]
    let (head, sum, wsum) = if super::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked at run time); the caller's bounds hold.
        unsafe { avx2::exp_sums(x, out, n, s, m, weighted) }
    } else {
        (0, 0.0, 0.0)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let (head, sum, wsum) = (0, 0.0, 0.0);
    let (mut sum, mut wsum) = (sum, wsum);
    for j in head..n {
        // SAFETY: j < n, within the caller's bounds.
        let z = unsafe { *x.add(j) } * s;
        let e = (z - m).exp();
        sum += e;
        if weighted {
            wsum += e * z;
        }
        if !out.is_null() {
            // SAFETY: as above.
            unsafe { *out.add(j) = e };
        }
    }
    (sum, wsum)
}

/// Cephes' polynomial for `(exp(r) - 1 - r) / r^2` on |r| <= ln2 / 2, highest degree first.
#[cfg(target_arch = "x86_64")]
const EXP_POLY: [f32; 6] = [1.987_569_1e-4, 1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5];

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hmax(v: __m256) -> f32 {
        let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// exp of eight lanes: `x = n ln2 + r`, |r| <= ln2 / 2, `exp(r)` by a degree-5 polynomial,
    /// `2^n` built in the exponent bits. Inputs below -87.3 give 0 (or a denormal), above 88.4 +inf-ish
    /// clamps to the largest finite power.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.336_54)), _mm256_set1_ps(88.376_26));
        let n = _mm256_round_ps(
            _mm256_fmadd_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E), _mm256_set1_ps(0.5)),
            _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC,
        );
        // r = x - n ln2, ln2 split in a part exact in f32 and the rest.
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(super::EXP_POLY[0]);
        for c in &super::EXP_POLY[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0));
        let pow2n =
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
        _mm256_mul_ps(y, pow2n)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn max_scaled(x: &[f32], s: f32) -> f32 {
        let n8 = x.len() / 8 * 8;
        let sv = _mm256_set1_ps(s);
        let mut acc = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut j = 0;
        while j < n8 {
            acc = _mm256_max_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(j)), sv));
            j += 8;
        }
        x[n8..].iter().map(|&v| v * s).fold(hmax(acc), f32::max)
    }

    /// `exp_sums` over whole groups of eight of the `n` elements at `x`, the exponentials written
    /// at `out` (x itself, another buffer or null): how many were done, and their two sums.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_sums(
        x: *const f32,
        out: *mut f32,
        n: usize,
        s: f32,
        m: f32,
        weighted: bool,
    ) -> (usize, f32, f32) {
        let n8 = n / 8 * 8;
        let (sv, mv) = (_mm256_set1_ps(s), _mm256_set1_ps(m));
        let (mut sum, mut wsum) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut j = 0;
        while j < n8 {
            let z = _mm256_mul_ps(_mm256_loadu_ps(x.add(j)), sv);
            let e = exp8(_mm256_sub_ps(z, mv));
            sum = _mm256_add_ps(sum, e);
            if weighted {
                wsum = _mm256_fmadd_ps(e, z, wsum);
            }
            if !out.is_null() {
                _mm256_storeu_ps(out.add(j), e);
            }
            j += 8;
        }
        (n8, hsum(sum), hsum(wsum))
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use std::arch::x86_64::*;

    /// The lanes of the 16 elements from `j` of `n` that exist (all but in a row's tail).
    #[inline(always)]
    pub fn lanes(j: usize, n: usize) -> __mmask16 {
        if n - j >= 16 {
            0xFFFF
        } else {
            (1u16 << (n - j)) - 1
        }
    }

    /// exp of sixteen lanes: [`super::avx2::exp8`]'s polynomial and range reduction.
    #[target_feature(enable = "avx512f")]
    pub fn exp16(x: __m512) -> __m512 {
        let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.336_54)), _mm512_set1_ps(88.376_26));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(_mm512_fmadd_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
            _mm512_set1_ps(0.5),
        ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let p = (super::EXP_POLY[1..].iter())
            .fold(_mm512_set1_ps(super::EXP_POLY[0]), |p, c| _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c)));
        // y 2^n, the power applied by AVX-512's scale instruction (n is whole already).
        _mm512_scalef_ps(_mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0)), n)
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn max_scaled(x: &[f32], s: f32) -> f32 {
        let (sv, none) = (_mm512_set1_ps(s), _mm512_set1_ps(f32::NEG_INFINITY));
        let mut acc = none;
        for j in (0..x.len()).step_by(16) {
            let k = lanes(j, x.len());
            // SAFETY: the mask covers only elements of x.
            let v = unsafe { _mm512_maskz_loadu_ps(k, x.as_ptr().add(j)) };
            acc = _mm512_max_ps(acc, _mm512_mask_mul_ps(none, k, v, sv));
        }
        _mm512_reduce_max_ps(acc)
    }

    /// `exp_sums` over all `n` elements at `x` (the tail under a mask), the exponentials written at
    /// `out` (x itself, another buffer or null).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_sums(x: *const f32, out: *mut f32, n: usize, s: f32, m: f32, weighted: bool) -> (f32, f32) {
        let (sv, mv) = (_mm512_set1_ps(s), _mm512_set1_ps(m));
        let (mut sum, mut wsum) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for j in (0..n).step_by(16) {
            let k = lanes(j, n);
            // SAFETY: the mask covers only the caller's n elements.
            let z = _mm512_mul_ps(unsafe { _mm512_maskz_loadu_ps(k, x.add(j)) }, sv);
            let e = exp16(_mm512_sub_ps(z, mv));
            sum = _mm512_mask_add_ps(sum, k, sum, e);
            if weighted {
                wsum = _mm512_mask3_fmadd_ps(e, z, wsum, k);
            }
            if !out.is_null() {
                // SAFETY: as above.
                unsafe { _mm512_mask_storeu_ps(out.add(j), k, e) };
            }
        }
        (_mm512_reduce_add_ps(sum), _mm512_reduce_add_ps(wsum))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponentials_and_sums_match_libm() {
        // A vocabulary-sized row with a tail that is not a multiple of eight, extremes included.
        let mut x: Vec<f32> = (0..32_003).map(|i| ((i as f32) * 0.37).sin() * 30.0 - 5.0).collect();
        x[7] = -1e30;
        x[100] = 80.0;
        for s in [1.0f32, 1.0 / 0.7] {
            let m = max_scaled(&x, s);
            let want_m = x.iter().map(|&v| v * s).fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(m, want_m);
            let mut e = vec![0f32; x.len()];
            let (sum, wsum) = exp_sums(&x, s, m, Some(&mut e), true);
            let (mut ws, mut ww) = (0f64, 0f64);
            for (j, &v) in x.iter().enumerate() {
                // libm's expf of the same f32 argument.
                let want = ((v * s) - m).exp() as f64;
                let z = (v * s) as f64;
                assert!((e[j] as f64 - want).abs() <= 3e-7 * want + 1e-37, "exp at {j}: {} vs {want}", e[j]);
                ws += want;
                ww += want * z;
            }
            assert!((sum as f64 - ws).abs() <= 1e-5 * ws, "{sum} vs {ws}");
            assert!((wsum as f64 - ww).abs() <= 1e-4 * ww.abs() + 1e-3, "{wsum} vs {ww}");
            assert_eq!(exp_sums(&x, s, m, None, false), (sum, 0.0));
            let mut inplace = x.clone();
            assert_eq!(exp_sums_in_place(&mut inplace, s, m, true), (sum, wsum));
            assert_eq!(inplace, e);
            // In place, normalised: the same exponentials over their sum.
            let mut p = x.clone();
            softmax_in_place(&mut p, s);
            for (j, &v) in p.iter().enumerate() {
                let want = e[j] as f64 / sum as f64;
                assert!((v as f64 - want).abs() <= 1e-6 * want + 1e-37, "softmax at {j}: {v} vs {want}");
            }
        }
    }

    /// Each vector variant the CPU has (the public functions take the widest), against libm, rows
    /// of every length up to a few vectors (the tails masked or left to the scalar loop).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn each_vector_variant_matches_libm() {
        let x: Vec<f32> = (0..70).map(|i| ((i as f32) * 0.71).sin() * 20.0).collect();
        for n in 0..x.len() {
            let row = &x[..n];
            let want_max = row.iter().map(|&v| v * 0.5).fold(f32::NEG_INFINITY, f32::max);
            let want_sum: f64 = row.iter().map(|&v| ((v * 0.5) - 3.0).exp() as f64).sum();
            let mut variants: Vec<(&str, f32, usize, f32, Vec<f32>)> = vec![];
            if crate::train::cpu::has_avx512() {
                let mut e = vec![0f32; n];
                // SAFETY: the CPU has AVX-512; the row and e hold n elements.
                let (m, (sum, _)) = unsafe {
                    (avx512::max_scaled(row, 0.5), avx512::exp_sums(row.as_ptr(), e.as_mut_ptr(), n, 0.5, 3.0, false))
                };
                variants.push(("avx512", m, n, sum, e));
            }
            if crate::train::cpu::has_avx2_fma() {
                let mut e = vec![0f32; n];
                // SAFETY: the CPU has AVX2 and FMA; the row and e hold n elements.
                let (m, (done, sum, _)) = unsafe {
                    (avx2::max_scaled(row, 0.5), avx2::exp_sums(row.as_ptr(), e.as_mut_ptr(), n, 0.5, 3.0, false))
                };
                variants.push(("avx2", m, done, sum, e));
            }
            for (what, m, done, sum, e) in variants {
                assert_eq!(m, want_max, "{what} max of {n}");
                let head: f64 = row[..done].iter().map(|&v| ((v * 0.5) - 3.0).exp() as f64).sum();
                let tail = want_sum - head;
                assert!((sum as f64 + tail - want_sum).abs() <= 1e-6 * want_sum + 1e-30, "{what} sum of {n}");
                for j in 0..done {
                    let want = ((row[j] * 0.5) - 3.0).exp();
                    assert!((e[j] - want).abs() <= 3e-7 * want, "{what} exp at {j} of {n}: {} vs {want}", e[j]);
                }
            }
        }
    }
}
