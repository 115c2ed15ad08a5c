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

/// The tiny Llama of tests/fixtures/train (vocabulary 128).
pub fn tiny_llama() -> PathBuf {
    root().join("tests/fixtures/train/llama")
}
