//! SwiGLU, `y = silu(g) * u`, and its backward in one pass over the elements each (candle's ops
//! take a dozen passes and temporaries for the backward): the sigmoid from the AVX-512 or AVX2
//! exponential of [`super::softmax`], in parallel chunks on rayon's pool.

use rayon::prelude::*;

/// Elements per parallel chunk.
const CHUNK: usize = 16 * 1024;

/// `silu(g) * u`.
pub fn forward(g: &[f32], u: &[f32]) -> Vec<f32> {
    assert_eq!(g.len(), u.len());
    let mut y = super::output_buffer(g.len());
    y.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK))).for_each(|(y, (g, u))| {
        let mut head = 0;
        #[cfg(target_arch = "x86_64")]
        if super::has_avx512() {
            // SAFETY: the CPU has AVX-512 (checked at run time); the slices have one length.
            head = unsafe { avx512::forward(g, u, y) };
        } else if super::has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA (checked at run time); the slices have one length.
            head = unsafe { avx2::forward(g, u, y) };
        }
        for i in head..g.len() {
            let s = 1.0 / (1.0 + (-g[i]).exp());
            y[i] = g[i] * s * u[i];
        }
    });
    y
}

/// The gradients `(dg, du)` of `silu(g) * u` for the output gradient `dy`:
/// `du = dy * g * s`, `dg = dy * u * s * (1 + g * (1 - s))` with `s = sigmoid(g)`.
pub fn backward(g: &[f32], u: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    assert!(g.len() == u.len() && g.len() == dy.len());
    let (mut dg, mut du) = (super::output_buffer(g.len()), super::output_buffer(g.len()));
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)).zip(dy.par_chunks(CHUNK)))
        .for_each(|((dg, du), ((g, u), dy))| {
            let mut head = 0;
            #[cfg(target_arch = "x86_64")]
            if super::has_avx512() {
                // SAFETY: the CPU has AVX-512 (checked at run time); the slices have one length.
                head = unsafe { avx512::backward(g, u, dy, dg, du) };
            } else if super::has_avx2_fma() {
                // SAFETY: the CPU has AVX2 and FMA (checked at run time); the slices have one length.
                head = unsafe { avx2::backward(g, u, dy, dg, du) };
            }
            for i in head..g.len() {
                let s = 1.0 / (1.0 + (-g[i]).exp());
                du[i] = dy[i] * g[i] * s;
                dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
            }
        });
    (dg, du)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::softmax::avx2::exp8;
    use std::arch::x86_64::*;

    /// `1 / (1 + exp(-g))` of eight lanes.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sigmoid8(g: __m256) -> __m256 {
        let one = _mm256_set1_ps(1.0);
        _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))))
    }

    /// The forward over whole groups of eight; returns how many elements it did.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn forward(g: &[f32], u: &[f32], y: &mut [f32]) -> usize {
        let n8 = g.len() / 8 * 8;
        for i in (0..n8).step_by(8) {
            let gv = _mm256_loadu_ps(g.as_ptr().add(i));
            let uv = _mm256_loadu_ps(u.as_ptr().add(i));
            _mm256_storeu_ps(y.as_mut_ptr().add(i), _mm256_mul_ps(_mm256_mul_ps(gv, sigmoid8(gv)), uv));
        }
        n8
    }

    /// The backward over whole groups of eight; returns how many elements it did.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn backward(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) -> usize {
        let n8 = g.len() / 8 * 8;
        let one = _mm256_set1_ps(1.0);
        for i in (0..n8).step_by(8) {
            let gv = _mm256_loadu_ps(g.as_ptr().add(i));
            let uv = _mm256_loadu_ps(u.as_ptr().add(i));
            let dyv = _mm256_loadu_ps(dy.as_ptr().add(i));
            let s = sigmoid8(gv);
            _mm256_storeu_ps(du.as_mut_ptr().add(i), _mm256_mul_ps(dyv, _mm256_mul_ps(gv, s)));
            // s * (1 + g * (1 - s))
            let dsilu = _mm256_mul_ps(s, _mm256_fmadd_ps(gv, _mm256_sub_ps(one, s), one));
            _mm256_storeu_ps(dg.as_mut_ptr().add(i), _mm256_mul_ps(_mm256_mul_ps(dyv, uv), dsilu));
        }
        n8
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::super::softmax::avx512::{exp16, lanes};
    use std::arch::x86_64::*;

    /// `1 / (1 + exp(-g))` of sixteen lanes. The reciprocal is AVX-512's 14-bit estimate with one
    /// Newton step (near f32's precision): a 16-lane division was the kernel's slowest instruction.
    #[target_feature(enable = "avx512f")]
    fn sigmoid16(g: __m512) -> __m512 {
        let one = _mm512_set1_ps(1.0);
        let d = _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)));
        let r = _mm512_rcp14_ps(d);
        // r (2 - d r)
        _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0)))
    }

    /// The forward over all elements (the tail under a mask); returns how many it did.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn forward(g: &[f32], u: &[f32], y: &mut [f32]) -> usize {
        let n = g.len();
        for i in (0..n).step_by(16) {
            let k = lanes(i, n);
            // SAFETY: the mask covers only elements of the three slices (one length).
            unsafe {
                let gv = _mm512_maskz_loadu_ps(k, g.as_ptr().add(i));
                let uv = _mm512_maskz_loadu_ps(k, u.as_ptr().add(i));
                _mm512_mask_storeu_ps(y.as_mut_ptr().add(i), k, _mm512_mul_ps(_mm512_mul_ps(gv, sigmoid16(gv)), uv));
            }
        }
        n
    }

    /// The backward over all elements (the tail under a mask); returns how many it did.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn backward(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) -> usize {
        let n = g.len();
        let one = _mm512_set1_ps(1.0);
        for i in (0..n).step_by(16) {
            let k = lanes(i, n);
            // SAFETY: the mask covers only elements of the five slices (one length).
            unsafe {
                let gv = _mm512_maskz_loadu_ps(k, g.as_ptr().add(i));
                let uv = _mm512_maskz_loadu_ps(k, u.as_ptr().add(i));
                let dyv = _mm512_maskz_loadu_ps(k, dy.as_ptr().add(i));
                let s = sigmoid16(gv);
                _mm512_mask_storeu_ps(du.as_mut_ptr().add(i), k, _mm512_mul_ps(dyv, _mm512_mul_ps(gv, s)));
                // s * (1 + g * (1 - s))
                let dsilu = _mm512_mul_ps(s, _mm512_fmadd_ps(gv, _mm512_sub_ps(one, s), one));
                _mm512_mask_storeu_ps(dg.as_mut_ptr().add(i), k, _mm512_mul_ps(_mm512_mul_ps(dyv, uv), dsilu));
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    /// y, du, dg against the formulas in f64 over the first `done` elements.
    fn check(g: &[f32], u: &[f32], dy: &[f32], (y, dg, du): (&[f32], &[f32], &[f32]), done: usize, what: &str) {
        for i in 0..done {
            let (gi, ui, di) = (g[i] as f64, u[i] as f64, dy[i] as f64);
            let s = 1.0 / (1.0 + (-gi).exp());
            let close = |a: f32, b: f64, out: &str| {
                assert!((a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs()), "{what} {out} at {i}: {a} vs {b}")
            };
            close(y[i], gi * s * ui, "y");
            close(du[i], di * gi * s, "du");
            close(dg[i], di * ui * s * (1.0 + gi * (1.0 - s)), "dg");
        }
    }

    #[test]
    fn swiglu_and_its_gradients_match_the_formulas_in_f64() {
        // Beyond one chunk, a tail that is not a multiple of eight or sixteen, large magnitudes.
        let n = 40_003;
        let g: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.173).sin() * 12.0).collect();
        let u: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.071).cos() * 3.0).collect();
        let dy: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.031).sin()).collect();
        let y = super::forward(&g, &u);
        let (dg, du) = super::backward(&g, &u, &dy);
        check(&g, &u, &dy, (&y, &dg, &du), n, "widest");
        // The AVX2 kernels too where the public functions take AVX-512.
        #[cfg(target_arch = "x86_64")]
        if crate::train::cpu::has_avx2_fma() {
            let (mut y, mut dg, mut du) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
            // SAFETY: the CPU has AVX2 and FMA; all slices hold n elements.
            let done = unsafe {
                super::avx2::forward(&g, &u, &mut y);
                super::avx2::backward(&g, &u, &dy, &mut dg, &mut du)
            };
            assert_eq!(done, n / 8 * 8);
            check(&g, &u, &dy, (&y, &dg, &du), done, "avx2");
        }
    }
}
