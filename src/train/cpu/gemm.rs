//! Products of strided f32 matrices through the `gemm` crate (its kernels chosen at run time for
//! the CPU), for the kernels that write into buffers they own or accumulate in place: the blocked
//! attention, the adapters' low-rank products added onto the frozen product ([`AddProduct`]), and
//! the frozen forward product `x W^T` with its output columns shared out among the threads
//! ([`times_transposed`]).

use candle_core::{CpuStorage, Layout};
use rayon::prelude::*;

/// A matrix operand: its first element and its row and column strides, in elements.
#[derive(Clone, Copy)]
pub struct Operand {
    pub ptr: *const f32,
    pub rs: usize,
    pub cs: usize,
}

/// `dst[m, n] = beta * lhs[m, k] rhs[k, n]`, plus `dst` when `add`; `dst` row-major with row stride
/// `dst_rs`. On `threads` threads of rayon's pool (1: the calling thread alone).
///
/// # Safety
/// The pointers must address the whole matrices their strides describe; `dst` must not overlap the
/// operands.
#[allow(clippy::too_many_arguments)]
pub unsafe fn product(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    add: bool,
    lhs: Operand,
    rhs: Operand,
    beta: f32,
    threads: usize,
) {
    let parallelism = match threads {
        0 | 1 => gemm::Parallelism::None,
        t => gemm::Parallelism::Rayon(t),
    };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        add,
        lhs.ptr,
        lhs.cs as isize,
        lhs.rs as isize,
        rhs.ptr,
        rhs.cs as isize,
        rhs.rs as isize,
        if add { 1.0 } else { 0.0 },
        beta,
        false,
        false,
        false,
        parallelism,
    )
}

/// Output columns of [`times_transposed`] per thread at least (fewer threads where the weight has
/// fewer rows).
const MIN_COLUMNS: usize = 64;

/// Weights with fewer rows than this go through candle's GEMM instead of [`times_transposed`]: at
/// SmolLM2's 192-row k/v projections the bands won in one run of the kernels bench and lost in two.
pub const BANDED_MIN_ROWS: usize = 256;

/// `y = x W^T` for x [m, k] and a row-major W [n, k], y [m, n] row-major: each of rayon's threads
/// computes a band of y's columns (a band of W's rows) alone. Through candle's GEMM, whose threads
/// each pack the whole transposed weight, the same products ran 2-32% slower at SmolLM2's shapes
/// (down_proj, 512 x 1536 -> 576: 2.9 vs 2.2 ms on two threads; `cargo bench --bench kernels`).
pub fn times_transposed(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    assert!(x.len() == m * k && w.len() == n * k, "times_transposed: shapes");
    let mut y = super::output_buffer(m * n);
    let bands = candle_core::utils::get_num_threads().min(n / MIN_COLUMNS).max(1);
    // Band widths a multiple of 16 floats (one AVX-512 register), the last band taking the rest.
    let width = n.div_ceil(bands).next_multiple_of(16).min(n);
    let dst = super::SharedMut::new(y.as_mut_ptr());
    (0..n.div_ceil(width)).into_par_iter().for_each(|b| {
        let (j0, j1) = (b * width, ((b + 1) * width).min(n));
        let lhs = Operand { ptr: x.as_ptr(), rs: k, cs: 1 };
        // SAFETY: W's rows j0..j1 are in bounds; each band writes its own columns of y.
        unsafe {
            let rhs = Operand { ptr: w.as_ptr().add(j0 * k), rs: 1, cs: k };
            product((m, j1 - j0, k), dst.at(j0), n, false, lhs, rhs, 1.0, 1)
        }
    });
    y
}

/// In place: `dst[m, n] += beta * lhs[m, k] rhs`, with `rhs` given as [k, n], or as [n, k] and
/// used transposed when `rhs_transposed` (LoRA: `y += s u B^T`, `dx += du A`). All contiguous f32.
pub struct AddProduct {
    pub beta: f32,
    pub rhs_transposed: bool,
}

impl candle_core::InplaceOp3 for AddProduct {
    fn name(&self) -> &'static str {
        "add-product"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        lhs: &CpuStorage,
        ll: &Layout,
        rhs: &CpuStorage,
        rl: &Layout,
    ) -> candle_core::Result<()> {
        let (m, n) = dl.shape().dims2()?;
        let (m2, k) = ll.shape().dims2()?;
        let (rows, cols) = rl.shape().dims2()?;
        let (k2, n2) = if self.rhs_transposed { (cols, rows) } else { (rows, cols) };
        if m != m2 || k != k2 || n != n2 {
            candle_core::bail!("add-product: [{m}, {n}] += [{m2}, {k}] x [{k2}, {n2}]");
        }
        let what = "add-product";
        let slice = |s: &'_ CpuStorage, l: &Layout| -> candle_core::Result<*const f32> {
            match l.contiguous_offsets() {
                Some((a, _)) => Ok(s.as_slice::<f32>()?[a..].as_ptr()),
                None => candle_core::bail!("{what}: the operands must be contiguous"),
            }
        };
        let (l, r) = (slice(lhs, ll)?, slice(rhs, rl)?);
        let Some((d0, d1)) = dl.contiguous_offsets() else {
            candle_core::bail!("{what}: the output must be contiguous")
        };
        let CpuStorage::F32(d) = dst else { candle_core::bail!("{what}: f32 only") };
        let d = &mut d[d0..d1];
        let rhs = match self.rhs_transposed {
            true => Operand { ptr: r, rs: 1, cs: k },
            false => Operand { ptr: r, rs: n, cs: 1 },
        };
        let threads = candle_core::utils::get_num_threads();
        // SAFETY: shapes checked above; the output is its own (contiguous) buffer.
        unsafe {
            product((m, n, k), d.as_mut_ptr(), n, true, Operand { ptr: l, rs: k, cs: 1 }, rhs, self.beta, threads)
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_transposed_equals_the_naive_product() {
        // Widths below one band, not a multiple of 16, and wide enough for several bands.
        for (m, k, n) in [(9, 5, 3), (33, 70, 130), (64, 96, 577), (17, 33, 1030)] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i as f32) * 0.37).sin()).collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i as f32) * 0.11).cos()).collect();
            let y = super::times_transposed(&x, m, k, &w, n);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|l| x[i * k + l] as f64 * w[j * k + l] as f64).sum();
                    let got = y[i * n + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{m}x{k}x{n} at ({i}, {j}): {got} vs {want}"
                    );
                }
            }
        }
    }
}
