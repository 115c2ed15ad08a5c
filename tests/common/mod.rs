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
    if p.exists() {
        return Some(p);
    }
    if std::env::var("TUNEKIT_REQUIRE_ASSETS").is_ok_and(|v| v == "1") {
        panic!("asset {} is missing; run .ci/fetch-assets", p.display());
    }
    eprintln!("SKIPPED: asset {} is missing (run .ci/fetch-assets to fetch it)", p.display());
    None
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
