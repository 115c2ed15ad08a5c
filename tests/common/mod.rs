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
