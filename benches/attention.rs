//! The CPU attention kernels of training, forward and backward of one layer at SmolLM2-135M's heads
//! (9 query heads over 3 key/value heads, width 64) for one conversation of each length: seconds,
//! the causal products' GFLOP/s, and the memory the forward keeps for the backward.
//! Run: `cargo bench --bench attention [-- LEN ...]`.

use std::time::Instant;
use tunekit::train::cpu::attention::{backward, forward, Heads, Logits, Segment};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut r = tunekit::split::SplitMix64::new(seed);
    (0..n).map(|_| (r.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5).collect()
}

fn main() {
    let lens: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let lens = if lens.is_empty() { vec![512, 2048, 8192] } else { lens };
    let dims = Heads { hq: 9, hkv: 3, d: 64 };
    let logits = Logits { scale: 0.125, softcap: None, window: None, sinks: None };
    println!("one layer, 9/3 heads x 64, {} threads", rayon::current_num_threads());
    println!(
        "{:>7} {:>10} {:>10} {:>12} {:>12} {:>10}",
        "tokens", "forward s", "backward s", "fwd GFLOP/s", "bwd GFLOP/s", "kept MB"
    );
    for len in lens {
        let (rq, rk) = (dims.hq * dims.d, dims.hkv * dims.d);
        let (q, k, v, dy) = (rand(len * rq, 1), rand(len * rk, 2), rand(len * rk, 3), rand(len * rq, 4));
        let seg = Segment { start: 0, len };
        let mut y = vec![0f32; len * rq];
        let reps = (4096 * 4096 / (len * len)).clamp(1, 20);
        let (mut fwd, mut bwd, mut kept) = (0.0, 0.0, 0);
        for _ in 0..reps {
            let t = Instant::now();
            let lse = forward(&q, &k, &v, dims, seg, logits, &mut y);
            fwd += t.elapsed().as_secs_f64();
            kept = lse.len() * 4;
            let (mut dq, mut dk, mut dv) = (vec![0f32; len * rq], vec![0f32; len * rk], vec![0f32; len * rk]);
            let t = Instant::now();
            backward((&q, &k, &v), (&y, &dy), &lse, dims, seg, logits, (&mut dq, &mut dk, &mut dv));
            bwd += t.elapsed().as_secs_f64();
        }
        let (fwd, bwd) = (fwd / reps as f64, bwd / reps as f64);
        // Causal products: half of each [L, L] x d product, per head.
        let product = (len * len) as f64 * dims.d as f64 * dims.hq as f64;
        println!(
            "{len:>7} {fwd:>10.4} {bwd:>10.4} {:>12.1} {:>12.1} {:>10.2}",
            2.0 * product / fwd / 1e9,
            4.0 * product / bwd / 1e9,
            kept as f64 / 1e6
        );
    }
}
