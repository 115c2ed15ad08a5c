//! CPU kernels at the shapes training and decoding call them with, against their limits: the
//! few-row product (decoding: 8 live rows against the vocabulary projection and a layer's weights)
//! in GFLOP/s and the bandwidth it streams the weight at, and candle's GEMM at a training step's
//! shapes in GFLOP/s. Run: `cargo bench --bench kernels`.

use candle_core::{Device, Tensor};
use std::time::Instant;
use tunekit::train::cpu::few_rows::matmul_t;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Median seconds of `f` over `reps` calls after one warm-up.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[reps / 2]
}

fn main() {
    println!(
        "{}",
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(str::to_string))
            .unwrap_or_default()
    );
    println!("few-row product y = x W^T (decoding)");
    for (m, k, n, what) in [
        (8, 256, 32_000, "bench vocab"),
        (8, 256, 688, "bench mlp"),
        (8, 256, 256, "bench attn"),
        (8, 256, 8, "bench lora A"),
        (8, 576, 49_152, "SmolLM2 vocab"),
        (8, 576, 1536, "SmolLM2 mlp"),
    ] {
        let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let s = time(50, || {
            std::hint::black_box(matmul_t(&x, m, k, &w, n));
        });
        let flops = 2.0 * (m * k * n) as f64;
        println!(
            "  {what:14} m={m} k={k} n={n}: {:.3} ms  {:.1} GFLOP/s  {:.1} GB/s of W",
            s * 1e3,
            flops / s / 1e9,
            (n * k * 4) as f64 / s / 1e9
        );
    }
    println!("GEMM (candle) at training shapes");
    let dev = Device::Cpu;
    for (m, k, n, what) in [
        (512, 256, 32_000, "bench head"),
        (768, 256, 688, "bench mlp"),
        (512, 576, 49_152, "SmolLM2 head"),
        (512, 576, 1536, "SmolLM2 mlp"),
    ] {
        let a = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let s = time(10, || {
            std::hint::black_box(a.matmul(&b.t().unwrap()).unwrap());
        });
        println!("  {what:14} {m}x{k} . {k}x{n}: {:.2} ms  {:.1} GFLOP/s", s * 1e3, 2.0 * (m * k * n) as f64 / s / 1e9);
    }
}
