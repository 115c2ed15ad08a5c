//! CPU kernels tunekit writes itself where candle's general ones lose time: causal attention that
//! skips the masked blocks ([`attention`]; candle's products compute all of them), the product of a
//! few rows with a frozen weight ([`few_rows`]), which decoding calls once per token for every layer
//! and the vocabulary projection (a GEMM packs the whole weight on every such call), and the
//! softmax statistics of the loss head's rows over the vocabulary ([`softmax`]; libm's scalar
//! `expf` took a tenth of a GRPO step), SwiGLU and rotary embeddings with their backward in one pass ([`swiglu`], [`rope`]), LoRA's
//! output-side backward products in one pass over the output gradient ([`lora`]), and
//! products that accumulate in place ([`gemm`]: LoRA's low-rank term onto the frozen product). Kernels are compiled for AVX2 + FMA, the
//! exponential's users (softmax, SwiGLU) for AVX-512 too, and chosen at run time by what the CPU
//! has; portable code otherwise.

pub mod attention;
pub mod few_rows;
pub mod gemm;
pub mod lora;
pub mod reduce;
pub mod rope;
pub mod softmax;
pub mod swiglu;

/// A buffer of `n` floats for a kernel that writes every element before any is read, so not
/// zero-filled first (that pass over memory per output was 3% of a step at SmolLM2 shapes). The
/// same uninitialised allocation as candle's own CPU ops (`alloc_uninit`), whose storage these
/// buffers become.
#[allow(clippy::uninit_vec)]
pub fn output_buffer(n: usize) -> Vec<f32> {
    if cfg!(test) {
        // In the unit tests the buffer is all NaN, so a kernel that reads an element before writing
        // it fails its comparison against the plain graph.
        return vec![f32::NAN; n];
    }
    let mut v = Vec::with_capacity(n);
    // SAFETY: f32 is Copy with no invalid bit patterns (candle's `alloc_uninit` does the same), and
    // every caller overwrites all n elements before reading any.
    unsafe { v.set_len(n) };
    v
}

/// A pointer into an output that parallel tasks share, each writing a region no other task touches
/// (attention's query blocks, the frozen product's column bands).
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(*mut f32);
// SAFETY: the tasks of a phase write disjoint regions (see each use) and read what no task of that
// phase writes.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    pub(crate) fn new(p: *mut f32) -> Self {
        Self(p)
    }

    /// The pointer `offset` elements on (a method, so closures capture the whole wrapper, not its
    /// field).
    pub(crate) fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Whether the CPU has AVX-512 (F) (checked once): the kernels that have a 16-lane version take it.
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| std::is_x86_feature_detected!("avx512f") && !avx512_disabled())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `TUNEKIT_NO_AVX512=1`: the AVX2 kernels even where the CPU has AVX-512 (to compare the two).
fn avx512_disabled() -> bool {
    std::env::var_os("TUNEKIT_NO_AVX512").is_some_and(|v| v != "0")
}

/// Whether the CPU has AVX2 and FMA (checked once).
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
