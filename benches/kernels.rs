//! CPU kernels at the shapes training and decoding call them with, against their limits: the
//! few-row product (decoding: 8 live rows against the vocabulary projection and a layer's weights)
//! in GFLOP/s and the bandwidth it streams the weight at, candle's GEMM at a training step's
//! shapes in GFLOP/s, and the GEMM-only bound of one LoRA SFT step at SmolLM2-135M shapes (every
//! product of the forward and the input-gradient backward, 512 tokens, timed alone and summed).
//! Run: `cargo bench --bench kernels`.

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
    fma_ceiling();
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
    frozen_forward(&dev);
    gemm_bound_smollm2(&dev);
    head_chunks(&dev);
    fused_projections(&dev);
    lora_products(&dev);
}

/// The CPU's own ceiling for the products below: AVX-512 fused multiply-adds in 12 independent
/// chains (no memory traffic), on one thread and on every thread of rayon's pool at once. A GEMM's
/// GFLOP/s read against these.
fn fma_ceiling() {
    #[cfg(target_arch = "x86_64")]
    {
        if !std::is_x86_feature_detected!("avx512f") {
            return;
        }
        #[target_feature(enable = "avx512f")]
        unsafe fn chains(n: usize) -> f32 {
            use std::arch::x86_64::*;
            let (b, c) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
            let mut acc = [_mm512_set1_ps(1.0); 12];
            for _ in 0..n {
                for a in acc.iter_mut() {
                    *a = _mm512_fmadd_ps(*a, b, c);
                }
            }
            _mm512_reduce_add_ps(acc.iter().fold(_mm512_setzero_ps(), |s, a| _mm512_add_ps(s, *a)))
        }
        let n = 50_000_000;
        let flops = (n * 12 * 32) as f64;
        let rate = |threads: usize| {
            let t = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..threads {
                    // SAFETY: AVX-512F checked above.
                    s.spawn(|| std::hint::black_box(unsafe { chains(n) }));
                }
            });
            threads as f64 * flops / t.elapsed().as_secs_f64() / 1e9
        };
        let all = rayon::current_num_threads();
        println!("FMA ceiling (AVX-512): one thread {:.0} GFLOP/s, {all} threads {:.0} GFLOP/s", rate(1), rate(all));
    }
}

/// The frozen forward `x W^T` (W [out, in] as stored) at SmolLM2's projection shapes: candle's GEMM
/// (the `gemm` crate's threads) against tunekit's bands of output columns, one per thread
/// (`cpu::gemm::times_transposed`, what training runs).
fn frozen_forward(dev: &Device) {
    println!("Frozen forward x W^T (SmolLM2, 512 tokens): candle's GEMM vs column bands per thread");
    for (k, n, what) in [(576, 576, "q, o"), (576, 192, "k, v"), (576, 1536, "gate, up"), (1536, 576, "down")] {
        let x = Tensor::randn(0f32, 1.0, (512, k), dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (n, k), dev).unwrap();
        let candle = time(20, || {
            std::hint::black_box(x.matmul(&w.t().unwrap()).unwrap());
        });
        let (xv, wv) = (flat(&x), flat(&w));
        let bands = time(20, || {
            std::hint::black_box(tunekit::train::cpu::gemm::times_transposed(&xv, 512, k, &wv, n));
        });
        let gf = |s: f64| 2.0 * (512 * k * n) as f64 / s / 1e9;
        println!(
            "  {what:9} {k:4} -> {n:4}: candle {:.3} ms ({:.0} GFLOP/s), bands {:.3} ms ({:.0} GFLOP/s)",
            candle * 1e3,
            gf(candle),
            bands * 1e3,
            gf(bands)
        );
    }
}

/// LoRA's rank-8 products: the forward's `x A^T` two ways, and the four of one backward (gate_proj's shapes: 512 tokens, 576 in, 1536 out),
/// through candle's matmul as the adapter calls them.
fn lora_products(dev: &Device) {
    let (t, inp, out, r) = (512usize, 576usize, 1536usize, 8usize);
    let dy = Tensor::randn(0f32, 1.0, (t, out), dev).unwrap();
    let (b, u) = (Tensor::randn(0f32, 1.0, (out, r), dev).unwrap(), Tensor::randn(0f32, 1.0, (t, r), dev).unwrap());
    let (x, a) = (Tensor::randn(0f32, 1.0, (t, inp), dev).unwrap(), Tensor::randn(0f32, 1.0, (r, inp), dev).unwrap());
    let flops = 2.0 * (t * out * r) as f64;
    let run = |what: &str, f: &dyn Fn() -> Tensor, fl: f64| {
        let s = time(20, || {
            std::hint::black_box(f());
        });
        println!("  {what:28} {:.3} ms  {:.1} GFLOP/s", s * 1e3, fl / s / 1e9);
    };
    println!("LoRA's rank-8 products (gate_proj: 512 tokens, 576 -> 1536)");
    let fl_in = 2.0 * (t * inp * r) as f64;
    run("u = x A^T (GEMM)", &|| x.matmul(&a.t().unwrap()).unwrap(), fl_in);
    run("u = (A x^T)^T (few_rows)", &|| tunekit::train::cpu::few_rows::low_rank(&x, &a).unwrap().unwrap(), fl_in);
    run("du = dy B [512x1536 . 1536x8]", &|| dy.matmul(&b).unwrap(), flops);
    run("db = dy^T u [1536x512 . 512x8]", &|| dy.t().unwrap().matmul(&u).unwrap(), flops);
    let (dyv, bv, uv) = (flat(&dy), flat(&b), flat(&u));
    let s = time(20, || {
        std::hint::black_box(tunekit::train::cpu::lora::output_grads(&dyv, &bv, &uv, t, out, r, 2.0));
    });
    println!("  {:28} {:.3} ms  {:.1} GFLOP/s", "du and db in one pass (cpu::lora)", s * 1e3, 2.0 * flops / s / 1e9);
    run("da = du^T x [8x512 . 512x576]", &|| u.t().unwrap().matmul(&x).unwrap(), fl_in);
    run("dx = du A [512x8 . 8x576]", &|| u.matmul(&a).unwrap(), fl_in);
}

/// The loss head's two products (logits `x W^T` and input gradient `d W`) by chunks of rows:
/// every call packs the whole [vocab, hidden] weight, so small chunks pay for it again and again.
fn head_chunks(dev: &Device) {
    println!("Loss head by chunks of rows (logits x W^T; input gradient d W)");
    for (vocab, hidden, what) in [(32_000usize, 256usize, "bench"), (49_152, 576, "SmolLM2")] {
        let w = Tensor::randn(0f32, 1.0, (vocab, hidden), dev).unwrap();
        for rows in [128usize, 256, 512] {
            let x = Tensor::randn(0f32, 1.0, (rows, hidden), dev).unwrap();
            let d = Tensor::randn(0f32, 1.0, (rows, vocab), dev).unwrap();
            let fl = 2.0 * (rows * hidden * vocab) as f64;
            let f = time(5, || {
                std::hint::black_box(x.matmul(&w.t().unwrap()).unwrap());
            });
            let b = time(5, || {
                std::hint::black_box(d.matmul(&w).unwrap());
            });
            println!(
                "  {what:8} {rows:3} rows: logits {:.1} GFLOP/s, input gradient {:.1} GFLOP/s",
                fl / f / 1e9,
                fl / b / 1e9
            );
        }
    }
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// The projections that read the same input (q, k, v; gate, up) as separate GEMMs and as one over
/// their stacked weights, forward and input gradient, at SmolLM2 shapes (512 tokens).
fn fused_projections(dev: &Device) {
    println!("Separate vs stacked projections (SmolLM2, 512 tokens), ms per layer");
    let t = 512;
    for (what, outs) in [("q,k,v", vec![576usize, 192, 192]), ("gate,up", vec![1536, 1536])] {
        let x = Tensor::randn(0f32, 1.0, (t, 576), dev).unwrap();
        let ws: Vec<Tensor> = outs.iter().map(|&n| Tensor::randn(0f32, 1.0, (n, 576), dev).unwrap()).collect();
        let stacked = Tensor::cat(&ws, 0).unwrap();
        let dys: Vec<Tensor> = outs.iter().map(|&n| Tensor::randn(0f32, 1.0, (t, n), dev).unwrap()).collect();
        let dy = Tensor::cat(&dys, 1).unwrap();
        let sep_f = time(10, || {
            for w in &ws {
                std::hint::black_box(x.matmul(&w.t().unwrap()).unwrap());
            }
        });
        let one_f = time(10, || {
            std::hint::black_box(x.matmul(&stacked.t().unwrap()).unwrap());
        });
        let sep_b = time(10, || {
            let mut acc = dys[0].matmul(&ws[0]).unwrap();
            for (d, w) in dys.iter().zip(&ws).skip(1) {
                acc = (acc + d.matmul(w).unwrap()).unwrap();
            }
            std::hint::black_box(acc);
        });
        let one_b = time(10, || {
            std::hint::black_box(dy.matmul(&stacked).unwrap());
        });
        println!(
            "  {what:8} forward {:.2} vs {:.2} stacked; input gradient {:.2} vs {:.2} stacked",
            sep_f * 1e3,
            one_f * 1e3,
            sep_b * 1e3,
            one_b * 1e3
        );
    }
}

/// Seconds of every GEMM of one SmolLM2-135M LoRA step (frozen base, 512 tokens, no checkpointing)
/// when each runs alone at candle's speed, and the tokens/s that bound allows.
fn gemm_bound_smollm2(dev: &Device) {
    let (t, h, kv, inter, vocab, layers, heads, hd) = (512usize, 576, 192, 1536, 49_152, 30, 9, 64);
    // (m, k, n, count per layer): y[m, n] = a[m, k] b[k, n].
    let per_layer = [
        // forward projections: q, o (576 -> 576), k, v (576 -> 192), gate, up (576 -> 1536), down
        (t, h, h, 2),
        (t, h, kv, 2),
        (t, h, inter, 2),
        (t, inter, h, 1),
        // input gradients of the same (dY W)
        (t, h, h, 2),
        (t, kv, h, 2),
        (t, inter, h, 2),
        (t, h, inter, 1),
    ];
    let attention = [
        // per head: scores, probs x V; backward dP, dV, dQ, dK
        (t, hd, t, 1),
        (t, t, hd, 1),
        (t, hd, t, 1),
        (t, t, hd, 3),
    ];
    let head = [(t, h, vocab, 1), (t, vocab, h, 1)];
    let time_of = |(m, k, n, c): (usize, usize, usize, usize)| -> (f64, f64) {
        let a = Tensor::randn(0f32, 1.0, (m, k), dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (k, n), dev).unwrap();
        let s = time(5, || {
            std::hint::black_box(a.matmul(&b).unwrap());
        });
        (s * c as f64, 2.0 * (m * k * n * c) as f64)
    };
    let sum = |v: &[(usize, usize, usize, usize)]| {
        v.iter().map(|&x| time_of(x)).fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
    };
    let (lin_s, lin_f) = sum(&per_layer);
    let (att_s, att_f) = sum(&attention);
    let (head_s, head_f) = sum(&head);
    let (lin_s, lin_f) = (lin_s * layers as f64, lin_f * layers as f64);
    let (att_s, att_f) = (att_s * (layers * heads) as f64, att_f * (layers * heads) as f64);
    let total = lin_s + att_s + head_s;
    println!("GEMM-only bound of one SmolLM2-135M LoRA step (512 tokens; LoRA's rank-8 products left out)");
    println!("  projections {:.2} s ({:.0} GFLOP/s)", lin_s, lin_f / lin_s / 1e9);
    println!("  attention   {:.2} s ({:.0} GFLOP/s)", att_s, att_f / att_s / 1e9);
    println!("  loss head   {:.2} s ({:.0} GFLOP/s)", head_s, head_f / head_s / 1e9);
    println!("  total       {:.2} s = {:.0} tokens/s at most", total, t as f64 / total);
}
