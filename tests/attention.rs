//! The CPU attention kernels against PyTorch: outputs and the gradients of q, k and v of packed rows
//! (two segments, one of them over 1,800 positions: several key tiles), grouped-query heads, a
//! sliding window, soft-capped scores and attention sinks, each against torch's own attention in f32
//! (tests/attention_vs_torch.py).

mod common;

use tunekit::train::cpu::attention::{backward, forward, Heads, Logits, Segment};

fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut r = tunekit::split::SplitMix64::new(seed);
    (0..n).map(|_| (r.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0).collect()
}

fn bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn floats(b: &[u8]) -> Vec<f32> {
    b.chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

#[test]
fn tiled_attention_equals_pytorch_for_long_packed_windowed_capped_and_sinking_rows() {
    let Some(py) = common::python_with("torch") else { return };
    let dims = Heads { hq: 8, hkv: 2, d: 32 };
    let lengths = [1800usize, 700];
    let t: usize = lengths.iter().sum();
    let (rq, rk) = (dims.hq * dims.d, dims.hkv * dims.d);
    let (q, k, v, dy) = (rand(t * rq, 1), rand(t * rk, 2), rand(t * rk, 3), rand(t * rq, 4));
    // Larger products than uniform inputs give, so the softmax is peaked and the cap bites.
    let q: Vec<f32> = q.iter().map(|x| x * 3.0).collect();
    let sinks: Vec<f32> = (0..dims.hq).map(|h| h as f32 * 0.5 - 1.0).collect();
    let cases: [(Option<usize>, Option<f32>, bool); 4] =
        [(None, None, false), (Some(300), None, false), (Some(300), Some(1.5), false), (None, None, true)];
    for (window, softcap, with_sinks) in cases {
        let logits = Logits { scale: 0.3, softcap, window, sinks: with_sinks.then_some(&sinks[..]) };
        let (mut y, mut dq, mut dk, mut dv) =
            (vec![0f32; t * rq], vec![0f32; t * rq], vec![0f32; t * rk], vec![0f32; t * rk]);
        let mut start = 0;
        for &len in &lengths {
            let s = Segment { start, len };
            let lse = forward(&q, &k, &v, dims, s, logits, &mut y);
            backward((&q, &k, &v), (&y, &dy), &lse, dims, s, logits, (&mut dq, &mut dk, &mut dv));
            start += len;
        }
        let dir = tempfile::tempdir().unwrap();
        for (name, x) in [("q", &q), ("k", &k), ("v", &v), ("dy", &dy)] {
            std::fs::write(dir.path().join(name), bytes(x)).unwrap();
        }
        let case = serde_json::json!({"hq": dims.hq, "hkv": dims.hkv, "d": dims.d, "lengths": lengths, "scale": 0.3,
            "window": window, "softcap": softcap, "sinks": with_sinks.then_some(&sinks)});
        std::fs::write(dir.path().join("case.json"), case.to_string()).unwrap();
        let script = common::root().join("tests/attention_vs_torch.py");
        let o = std::process::Command::new(&py).arg(&script).arg(dir.path()).arg(dir.path()).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        for (name, got) in [("y", &y), ("dq", &dq), ("dk", &dk), ("dv", &dv)] {
            let want = floats(&std::fs::read(dir.path().join(name)).unwrap());
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            let diff = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(diff <= 2e-5 * scale.max(1.0), "{name} differs from PyTorch by {diff} (of {scale}) in {case}");
        }
    }
}
