//! Products of strided f32 matrices through the `gemm` crate (its kernels chosen at run time for
//! the CPU), for the kernels that write into buffers they own or accumulate in place: the blocked
//! attention, and the adapters' low-rank products added onto the frozen product ([`AddProduct`]).

use candle_core::{CpuStorage, Layout};

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
