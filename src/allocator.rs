//! The process's memory allocator (mimalloc, set in `main.rs`): how long it keeps freed memory, and
//! handing freed memory back to the system at the points where a run's working set shrinks.

use std::sync::atomic::{AtomicBool, Ordering};

// Named so that mimalloc's library is linked wherever this module is (test binaries included).
extern crate mimalloc as _;

extern "C" {
    /// mimalloc's run-time options.
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
    /// mimalloc: frees what it can; `force` returns all freed memory to the system now.
    fn mi_collect(force: bool);
}

/// How long freed memory stays with the process before it goes back to the system.
///
/// 3 s (mimalloc v3's default is 1 s): a training step frees and reallocates the same large buffers
/// from one step to the next, and each return made the kernel zero fresh pages for the next step (at
/// 100 ms: 140k page faults and 1.5 s of system time in ten SmolLM2-shape steps, 6-9% of the
/// speed). Never returning it (as tunekit once did) cost memory instead: buffers of many sizes (a
/// long conversation's backward) piled up, one 16k-token LoRA step peaking at 2,607 MB against
/// 2,039 MB at 3 s and 1,831 MB at 100 ms (benches/RESULTS.md, "Long conversations").
/// `MIMALLOC_PURGE_DELAY` in the environment still decides when it is set.
pub fn configure() {
    set_purge_delay_ms(3000);
}

/// Memory first (`--qlora`): freed memory goes back after 100 ms, so buffers freed in one phase of
/// a step (the forward, a layer's backward) do not stay resident through the next. Costs 6-9% of
/// the speed at SmolLM2 shapes (the pages are faulted in again) and saves 30-50 MB of a QLoRA step
/// on SmolLM2 (benches/RESULTS.md, "QLoRA vs LoRA").
pub fn favour_memory() {
    MEMORY_FIRST.store(true, Ordering::Relaxed);
    set_purge_delay_ms(100);
}

/// Set by `favour_memory`: the run asked for memory first, so the steps keep its short delay.
static MEMORY_FIRST: AtomicBool = AtomicBool::new(false);

/// Micro-batches up to this many tokens allocate the same buffers every step and free them all by
/// its end, so holding freed memory between steps costs nothing: one 2,048-token row of the
/// long-conversation bench's model peaked at 552 MB held 60 s against 544 MB at 3 s, where one
/// 8,192-token row never returning memory peaked at 1,335 MB against 1,116 MB (a long row's
/// backward frees buffers of many sizes).
const STEADY_STEP_TOKENS: usize = 4096;

/// Before the training steps: when no micro-batch is longer than `STEADY_STEP_TOKENS`, freed
/// memory stays with the process for 60 s instead of 3 s. mimalloc purges everything free when a
/// delay expires, however recently it was freed, so at 3 s one short step in three (every step on a
/// loaded host) found the last step's buffers returned and faulted them in again, zeroed and split
/// into small pages: ten SmolLM2-shape steps took 31-43k page faults and 1.6-6.1 s of system time,
/// against 9.4-9.7k faults and 1.0-3.5 s held 60 s, peak memory the same (1.42-1.44 GB). Runs that
/// asked for memory first (`--qlora`) and runs with longer micro-batches keep their delay; so does
/// a method that does not know its micro-batches ahead (`None`: generation's buffers vary).
pub fn hold_between_steps(largest_micro_batch_tokens: Option<usize>) {
    let steady = largest_micro_batch_tokens.is_some_and(|t| t <= STEADY_STEP_TOKENS);
    if steady && !MEMORY_FIRST.load(Ordering::Relaxed) {
        set_purge_delay_ms(60_000);
    }
}

fn set_purge_delay_ms(ms: std::ffi::c_long) {
    const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15; // mimalloc v3's mi_option_purge_delay
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting an allocator option is thread-safe and takes effect for later frees.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, ms) };
    }
}

/// Hands the freed memory the allocator can reach back to the system now: after a model is loaded
/// its dequantised and converted temporaries are free, and under the purge delay they would stay
/// resident into the first step.
pub fn release_freed_memory() {
    // SAFETY: mi_collect only returns memory mimalloc holds free; without mimalloc as the global
    // allocator (test binaries) its heap is empty and this does nothing.
    unsafe { mi_collect(true) };
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap memory to the OS (the system allocator's, where
    // mimalloc is not the global allocator).
    unsafe {
        libc::malloc_trim(0);
    }
}
