//! Families in and out of llama.cpp: tests/fixtures/families/make_gguf.py builds a tiny random OLMo 2,
//! Granite, SmolLM3, Gemma 2 or Phi-3 checkpoint with transformers and converts it with llama.cpp's own
//! convert_hf_to_gguf.py (no real file of these families is on the package registries). tunekit must
//! read the GGUF as the Hugging Face directory (same logits), and llama.cpp itself (node-llama-cpp) must
//! give tunekit's next-token log-probabilities for the base, the base with tunekit's exported adapter
//! GGUF, and the merged f32 GGUF. Needs torch + transformers, the converter (.ci/fetch-assets) and
//! node-llama-cpp (.ci/fetch-tools); skipped with a note otherwise, failed under TUNEKIT_REQUIRE_ASSETS=1.

mod common;

use candle_core::{Device, Tensor};
use std::path::Path;
use tunekit::train::adapters::lora::{LoraSettings, ALL_LINEAR};
use tunekit::train::io::load_base;
use tunekit::train::model::Model;

/// Prompt ids (valid in the Qwen3 and the 32,000-piece SentencePiece vocabularies) the runtimes are
/// compared on.
const PROMPTS: [&[u32]; 2] = [&[785, 6722, 315, 9625, 374], &[9707, 11, 1879, 0, 3555, 525, 498, 3351, 30, 358, 1079]];

/// Log-softmax of tunekit's next-token logits after `ids`.
fn next_log_probs(m: &Model, ids: &[u32]) -> Vec<f32> {
    let (dev, n) = (Device::Cpu, ids.len());
    let logits =
        m.logits(&Tensor::new(ids, &dev).unwrap(), &Tensor::arange(0u32, n as u32, &dev).unwrap(), &[n]).unwrap();
    candle_nn::ops::log_softmax(&logits.get(n - 1).unwrap(), 0).unwrap().to_vec1::<f32>().unwrap()
}

/// llama.cpp's top-20 next-token log-probabilities after each prompt, on `model` with `lora` ("-": none).
fn llama_cpp_top(node_dir: &Path, model: &Path, lora: &str) -> Vec<Vec<(usize, f32)>> {
    let requests: Vec<_> =
        PROMPTS.iter().map(|ids| serde_json::json!({"ids": ids, "max_tokens": 1, "top": 20})).collect();
    let results = common::llama_cpp_eval(node_dir, model, lora, &requests);
    results
        .iter()
        .map(|r| {
            let top = r["top"].as_array().unwrap();
            top.iter().map(|e| (e[0].as_u64().unwrap() as usize, e[1].as_f64().unwrap() as f32)).collect()
        })
        .collect()
}

/// The largest difference between llama.cpp's top log-probabilities and tunekit's.
fn worst(llama: &[Vec<(usize, f32)>], m: &Model) -> f32 {
    let mut worst = 0f32;
    for (ids, top) in PROMPTS.iter().zip(llama) {
        let lp = next_log_probs(m, ids);
        for &(t, l) in top {
            worst = worst.max((lp[t] - l).abs());
        }
    }
    worst
}

fn check(family: &str) {
    let Some(node_dir) = common::node_llama_cpp() else { return };
    let Some(llama_cpp) = common::asset("llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/conversion") else { return };
    let Some(spm) = common::asset("mistral-common/mistral_common/data/tokenizer.model.v1") else { return };
    let Some(py) = common::python_with("torch, transformers") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let script = common::root().join("tests/fixtures/families/make_gguf.py");
    let llama_cpp = llama_cpp.parent().unwrap();
    let o = std::process::Command::new(py).arg(script).arg(family).arg(dir).arg(llama_cpp).arg(spm).output().unwrap();
    assert!(o.status.success(), "make_gguf.py {family}: {}", String::from_utf8_lossy(&o.stderr));
    let (hf, gguf) = (dir.join("hf"), dir.join("model.gguf"));
    let dev = Device::Cpu;

    // tunekit reads llama.cpp's file as the Hugging Face directory.
    let from_hf = Model::from_base(&load_base(&hf, &dev, None).unwrap(), &dev).unwrap();
    let from_gguf = Model::from_base(&load_base(&gguf, &dev, None).unwrap(), &dev).unwrap();
    let mut read = 0f32;
    for ids in PROMPTS {
        let (a, b) = (next_log_probs(&from_hf, ids), next_log_probs(&from_gguf, ids));
        read = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(read, f32::max);
    }
    assert!(read < 1e-4, "{family}: the GGUF reads {read} nats from the Hugging Face directory");

    // A random adapter on every projection, exported for llama.cpp and merged.
    let mut tuned = Model::from_base(&load_base(&gguf, &dev, None).unwrap(), &dev).unwrap();
    // All seven names: on Phi-3 they select its fused qkv_proj and gate_up_proj.
    let targets = ALL_LINEAR.iter().map(|t| t.to_string()).collect();
    let s = LoraSettings {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        rslora: false,
        targets,
        doubled_gate_up: false,
        train_router: false,
        use_dora: false,
        init: Default::default(),
    };
    tuned.add_lora(&s, 7).unwrap();
    let mut rng = tunekit::split::SplitMix64::new(40);
    for (_, var) in tuned.lora_vars() {
        let n = var.as_tensor().elem_count();
        let v: Vec<f32> = (0..n).map(|_| (rng.normal() * 0.1) as f32).collect();
        var.set(&Tensor::from_vec(v, var.as_tensor().shape(), &dev).unwrap()).unwrap();
    }
    let adapter = dir.join("adapter");
    tunekit::train::io::peft::save(&tuned, &s, &gguf.display().to_string(), &adapter).unwrap();
    let g = gguf.to_str().unwrap();
    let a = adapter.to_str().unwrap();
    for args in [
        vec!["-q", "export", "gguf", "--adapter", a, "--model", g, "--out", "a.gguf", "--type", "f32"],
        vec!["-q", "export", "gguf", "--merge", "--adapter", a, "--model", g, "--out", "m.gguf", "--type", "f32"],
    ] {
        let o = common::tunekit(&args, dir);
        assert!(o.status.success(), "{family}: {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let base = worst(&llama_cpp_top(&node_dir, &gguf, "-"), &from_gguf);
    let with = worst(&llama_cpp_top(&node_dir, &gguf, dir.join("a.gguf").to_str().unwrap()), &tuned);
    let merged = worst(&llama_cpp_top(&node_dir, &dir.join("m.gguf"), "-"), &tuned);
    let effect = PROMPTS
        .iter()
        .map(|ids| {
            let (a, b) = (next_log_probs(&tuned, ids), next_log_probs(&from_gguf, ids));
            a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
        })
        .fold(0f32, f32::max);
    eprintln!(
        "{family}: GGUF vs HF in tunekit {read:.1e}; llama.cpp vs tunekit: base {base:.1e}, with the adapter GGUF \
         {with:.1e}, merged {merged:.1e} (the adapter moves log-probs by up to {effect:.2})"
    );
    for (what, d) in [("base", base), ("base + adapter", with), ("merged", merged)] {
        assert!(d < 5e-3, "{family}: llama.cpp on the {what} is {d} nats from tunekit");
    }
    assert!(effect > 100.0 * with.max(merged), "{family}: the adapter's effect {effect} must dwarf the difference");
}

#[test]
fn olmo2_through_llama_cpp() {
    check("olmo2");
}

#[test]
fn granite_through_llama_cpp() {
    check("granite");
}

#[test]
fn smollm3_through_llama_cpp() {
    check("smollm3");
}

#[test]
fn gemma2_through_llama_cpp() {
    check("gemma2");
}

#[test]
fn phi3_through_llama_cpp() {
    check("phi3");
}
