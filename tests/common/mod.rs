//! Helpers shared by the integration tests: locating fetched assets and running the binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where `.ci/fetch-assets` unpacks the registry packages (TUNEKIT_ASSETS overrides).
pub fn assets_dir() -> PathBuf {
    std::env::var_os("TUNEKIT_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/tunekit-assets"))
}

/// A fetched asset, or None with a note when it is absent. CI sets TUNEKIT_REQUIRE_ASSETS=1 so a
/// missing asset fails there instead of passing silently.
pub fn asset(rel: &str) -> Option<PathBuf> {
    let p = assets_dir().join(rel);
    found(p.exists().then_some(p.clone()), &format!("asset {} (run .ci/fetch-assets)", p.display()))
}

/// Something a test checks against (an asset, a tool such as llama.cpp, Go or Chromium): `thing`
/// when it is there; otherwise a SKIPPED note and None, or, under TUNEKIT_REQUIRE_ASSETS=1 (CI,
/// where .ci/fetch-assets and .ci/fetch-tools install everything), a failure.
pub fn found<T>(thing: Option<T>, what: &str) -> Option<T> {
    if thing.is_none() {
        if std::env::var("TUNEKIT_REQUIRE_ASSETS").is_ok_and(|v| v == "1") {
            panic!("missing: {what}");
        }
        eprintln!("SKIPPED: missing {what}");
    }
    thing
}

/// A command that runs (`args` answered with success).
pub fn runs(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd).args(args).output().is_ok_and(|o| o.status.success())
}

/// A Python (TUNEKIT_PYTHON, else python3) that imports `module` (.ci/fetch-tools makes one).
pub fn python_with(module: &str) -> Option<String> {
    let py = std::env::var("TUNEKIT_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = runs(&py, &["-c", &format!("import {module}")]);
    found(ok.then_some(py.clone()), &format!("the `{module}` package for {py} (.ci/fetch-tools)"))
}

/// llama.cpp as users run it: the directory where `npm i -E node-llama-cpp@3.21.1` was run
/// (NODE_LLAMA_CPP_DIR, default ~/.cache/tunekit-tools/llama; `.ci/fetch-tools` installs it).
pub fn node_llama_cpp() -> Option<PathBuf> {
    let dir = std::env::var_os("NODE_LLAMA_CPP_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/tunekit-tools/llama"));
    let there = dir.join("node_modules/node-llama-cpp/package.json").exists();
    found(there.then_some(dir.clone()), &format!("node-llama-cpp in {} (.ci/fetch-tools)", dir.display()))
}

/// llama.cpp's answers to `requests` (tests/llama_cpp/eval.mjs: each `{"text" or "ids", "max_tokens",
/// "top"}` gives `{"llama_ids", "top", "greedy"}`) on `model` with the adapter `lora` ("-": none).
pub fn llama_cpp_eval(
    node_dir: &Path,
    model: &Path,
    lora: &str,
    requests: &[serde_json::Value],
) -> Vec<serde_json::Value> {
    let dir = tempfile::tempdir().unwrap();
    let req = dir.path().join("requests.json");
    std::fs::write(&req, serde_json::to_string(requests).unwrap()).unwrap();
    let script = root().join("tests/llama_cpp/eval.mjs");
    let o = Command::new("node")
        .args([script.to_str().unwrap(), model.to_str().unwrap(), lora, req.to_str().unwrap()])
        .env("NODE_LLAMA_CPP_DIR", node_dir)
        .output()
        .expect("run node");
    assert!(o.status.success(), "node: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("node prints JSON")
}

pub fn tunekit(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tunekit")).args(args).current_dir(cwd).output().expect("run tunekit")
}

pub fn stdout_json(out: &Output) -> serde_json::Value {
    let s = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(s.trim()).unwrap_or_else(|e| {
        panic!("stdout is not one JSON object ({e}):\n{s}\nstderr:\n{}", String::from_utf8_lossy(&out.stderr))
    })
}

pub fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("valid JSON line"))
        .collect()
}

/// Packed rows of a tiny "language": each segment counts upward from a random start, so the
/// next token is learnable; the first half of each segment is a prompt (not trained).
pub fn counting_shards(dir: &Path, vocab: usize, rows: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = tunekit::split::SplitMix64::new(3);
    let mut w = tunekit::pack::shards::ShardWriter::new(dir, "train", 1 << 30);
    let mut e = tunekit::pack::shards::ShardWriter::new(dir, "eval", 1 << 30);
    for r in 0..rows {
        let mut row = tunekit::pack::rows::PackedRow::default();
        for _ in 0..3 {
            let len = 10 + rng.below(10);
            let start = rng.below(100);
            let ids: Vec<u32> = (0..len).map(|k| ((start + k) % 120) as u32).collect();
            let labels: Vec<i32> =
                ids.iter().enumerate().map(|(k, &t)| if k >= len / 2 { t as i32 } else { -100 }).collect();
            row.push(&tunekit::tokenize::Sample { input_ids: ids, labels });
        }
        if r % 5 == 4 {
            e.write(vec![row]).unwrap()
        } else {
            w.write(vec![row]).unwrap()
        }
    }
    w.finish().unwrap();
    e.finish().unwrap();
    let m = serde_json::json!({"tokenizer": {"vocab_size": vocab, "path": "synthetic"}, "seq_len": 64});
    std::fs::write(dir.join("manifest.json"), m.to_string()).unwrap();
}

/// Preference shards of a toy task: chosen answers continue the prompt's count, rejected ones repeat
/// a token. 24 training and 8 held-out pairs.
pub fn counting_pairs(data: &Path, seed: u64) -> Vec<tunekit::pack::preference::PreferenceRow> {
    use tunekit::pack::preference::{PreferenceRow, PreferenceWriter};
    std::fs::create_dir_all(data).unwrap();
    let mut rng = tunekit::split::SplitMix64::new(seed);
    let mut pair = || {
        let s = rng.below(90);
        let prompt: Vec<i32> = (0..6).map(|k| (s + k) as i32).collect();
        let side = |ans: Vec<i32>| {
            let ids: Vec<i32> = prompt.iter().cloned().chain(ans).collect();
            let labels: Vec<i32> = ids.iter().enumerate().map(|(i, &t)| if i >= 6 { t } else { -100 }).collect();
            (ids, labels)
        };
        let (ci, cl) = side((6..12).map(|k| (s + k) as i32).collect());
        let (ri, rl) = side(vec![(s as i32 + 50) % 120; 6]);
        PreferenceRow { chosen_input_ids: ci, chosen_labels: cl, rejected_input_ids: ri, rejected_labels: rl }
    };
    let pairs: Vec<PreferenceRow> = (0..33).map(|_| pair()).collect();
    let mut w = PreferenceWriter::new(data, "train");
    w.write(pairs[..24].to_vec()).unwrap();
    w.finish().unwrap();
    let mut e = PreferenceWriter::new(data, "eval");
    e.write(pairs[24..32].to_vec()).unwrap();
    e.finish().unwrap();
    std::fs::write(data.join("manifest.json"), serde_json::json!({"tokenizer": {"vocab_size": 128}}).to_string())
        .unwrap();
    pairs
}

/// The tiny Llama of tests/fixtures/train (vocabulary 128).
pub fn tiny_llama() -> PathBuf {
    root().join("tests/fixtures/train/llama")
}

/// A word-level tokenizer over the tiny Llama's 128 ids ("t3".."t127"; </s> = 2 ends a turn) with a chat
/// template that renders the last user message as it is.
pub fn word_tokenizer(dir: &Path) -> PathBuf {
    let t = dir.join("tok");
    std::fs::create_dir_all(&t).unwrap();
    let mut vocab = serde_json::Map::new();
    for (i, w) in ["<pad>", "<unk>", "</s>"].iter().enumerate() {
        vocab.insert(w.to_string(), i.into());
    }
    for i in 3..128 {
        vocab.insert(format!("t{i}"), i.into());
    }
    let added: Vec<serde_json::Value> = ["<pad>", "<unk>", "</s>"]
        .iter()
        .enumerate()
        .map(|(i, w)| serde_json::json!({"id": i, "content": w, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let tj = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(t.join("tokenizer.json"), tj.to_string()).unwrap();
    let cfg = serde_json::json!({"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
        "chat_template": "{{ messages[-1]['content'] }}"});
    std::fs::write(t.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    t
}

/// 30 prompts of 4-8 words with a reference answer, and one prompt of 40 words.
pub fn prompt_rows(dir: &Path) -> PathBuf {
    let mut rng = tunekit::split::SplitMix64::new(1);
    let mut lines = String::new();
    for i in 0..30 {
        let n = 4 + rng.below(5);
        let words: Vec<String> = (0..n).map(|_| format!("t{}", 3 + rng.below(125))).collect();
        let row = serde_json::json!({"prompt": words.join(" "), "answer": format!("t{}", 3 + i % 4)});
        lines.push_str(&format!("{row}\n"));
    }
    let long: Vec<String> = (0..40).map(|k| format!("t{}", 3 + k)).collect();
    lines.push_str(&format!("{}\n", serde_json::json!({"prompt": long.join(" "), "answer": "t5"})));
    let p = dir.join("prompts.jsonl");
    std::fs::write(&p, lines).unwrap();
    p
}

/// Prompt shards (`prepare --method prompts`, a fifth held out) of [`prompt_rows`] in `dir/p`.
pub fn prompt_shards(dir: &Path) -> PathBuf {
    let tok = word_tokenizer(dir);
    let src = prompt_rows(dir);
    let out = tunekit(
        &[
            "--json",
            "prepare",
            src.to_str().unwrap(),
            "--method",
            "prompts",
            "--tokenizer",
            tok.to_str().unwrap(),
            "--out",
            "p",
            "--seq-len",
            "16",
            "--eval-fraction",
            "0.2",
            "--dedup",
            "none",
        ],
        dir,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = stdout_json(&out);
    assert_eq!(s["rows_read"], 31);
    assert_eq!(s["rejected_by_reason"]["prompt_too_long"], 1, "the 40-word prompt is counted, not cut: {s}");
    assert_eq!(s["samples"].as_u64().unwrap() + 1, 31);
    dir.join("p")
}
