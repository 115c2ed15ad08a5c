//! The manual (docs/, an mdBook) and the README stay true to the binary: every page is in the
//! book's summary and every link resolves; every `tunekit` command in a shell block names a real
//! subcommand and only flags its `--help` lists; and the blocks marked `sh,run` run, page by page in
//! a scratch directory with the repository's `datasets/` beside them, and succeed.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The pages: README.md and every Markdown file of docs/src, with their text.
fn pages() -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "md") {
                out.push(p);
            }
        }
    }
    let root = common::root();
    let mut files = vec![root.join("README.md")];
    walk(&root.join("docs/src"), &mut files);
    files.sort();
    files.into_iter().map(|p| (p.clone(), std::fs::read_to_string(&p).unwrap())).collect()
}

/// A fenced code block: its info string (`sh`, `sh,run`) and its lines.
struct Block {
    info: String,
    text: String,
}

fn blocks(text: &str) -> Vec<Block> {
    let mut out = vec![];
    let mut open: Option<Block> = None;
    for line in text.lines() {
        match (&mut open, line.trim_start().strip_prefix("```")) {
            (None, Some(info)) => open = Some(Block { info: info.trim().to_string(), text: String::new() }),
            (Some(_), Some(_)) => out.push(open.take().unwrap()),
            (Some(b), None) => {
                b.text.push_str(line);
                b.text.push('\n');
            }
            (None, None) => {}
        }
    }
    out
}

/// The targets of a page's Markdown links and images (`[text](target)`), outside code blocks.
fn links(text: &str) -> Vec<String> {
    let mut out = vec![];
    let mut in_code = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            let Some(end) = after.find(')') else { break };
            out.push(after[..end].to_string());
            rest = &after[end..];
        }
    }
    out
}

#[test]
fn every_page_is_in_the_summary_and_every_link_resolves() {
    let root = common::root();
    let src = root.join("docs/src");
    let summary = std::fs::read_to_string(src.join("SUMMARY.md")).unwrap();
    let listed: BTreeSet<PathBuf> = links(&summary).iter().map(|l| src.join(l)).collect();
    let mut problems = vec![];
    for (path, text) in pages() {
        let in_book = path.starts_with(&src) && path.file_name().is_some_and(|n| n != "SUMMARY.md");
        if in_book && !listed.contains(&path) {
            problems.push(format!("{} is not in docs/src/SUMMARY.md", path.display()));
        }
        for target in links(&text) {
            if target.starts_with("http://") || target.starts_with("https://") || target.starts_with('#') {
                continue;
            }
            let file = target.split('#').next().unwrap();
            if !path.parent().unwrap().join(file).exists() {
                problems.push(format!("{}: the link {target} goes nowhere", path.display()));
            }
        }
    }
    for p in &listed {
        if !p.exists() {
            problems.push(format!("SUMMARY.md lists {}, which does not exist", p.display()));
        }
    }
    assert!(listed.len() > 20, "the summary lists {} pages", listed.len());
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Shell words of a line, quotes removed (enough for the manual's commands).
fn words(line: &str) -> Vec<String> {
    let (mut out, mut cur, mut quote, mut any) = (vec![], String::new(), None, false);
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, '\'' | '"') => {
                quote = Some(c);
                any = true;
            }
            (Some(q), c) if c == q => quote = None,
            (None, '\\') => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            (None, c) if c.is_whitespace() => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            (_, c) => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Every `tunekit` invocation of a shell block: (the subcommand's words, the flags given).
fn invocations(block: &str) -> Vec<(Vec<String>, Vec<String>)> {
    let joined = block.replace("\\\n", " ");
    let mut out = vec![];
    for line in joined.lines() {
        let w = words(line);
        let mut i = 0;
        while i < w.len() {
            if w[i] != "tunekit" {
                i += 1;
                continue;
            }
            i += 1;
            while i < w.len() && matches!(w[i].as_str(), "-q" | "--quiet" | "--json") {
                i += 1;
            }
            let mut sub = vec![];
            if let Some(s) = w.get(i) {
                sub.push(s.clone());
                i += 1;
                if matches!(s.as_str(), "export" | "validate") {
                    if let Some(t) = w.get(i) {
                        sub.push(t.clone());
                        i += 1;
                    }
                }
            }
            let mut flags = vec![];
            while i < w.len()
                && !matches!(w[i].as_str(), "&&" | "||" | "|" | ";" | ">" | ">>")
                && !w[i].starts_with('#')
            {
                if w[i].starts_with("--") {
                    flags.push(w[i].split('=').next().unwrap().to_string());
                }
                i += 1;
            }
            out.push((sub, flags));
        }
    }
    out
}

#[test]
fn every_command_in_the_manual_names_real_subcommands_and_flags() {
    let bin = env!("CARGO_BIN_EXE_tunekit");
    let mut help: BTreeMap<Vec<String>, Option<String>> = BTreeMap::new();
    let mut problems = vec![];
    let mut checked = 0;
    for (path, text) in pages() {
        for b in blocks(&text).iter().filter(|b| b.info.starts_with("sh")) {
            for (sub, flags) in invocations(&b.text) {
                let page = path.strip_prefix(common::root()).unwrap().display().to_string();
                let h = help.entry(sub.clone()).or_insert_with(|| {
                    let out = Command::new(bin).args(&sub).arg("--help").output().unwrap();
                    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).to_string())
                });
                let Some(h) = h else {
                    problems.push(format!("{page}: `tunekit {}` is not a command", sub.join(" ")));
                    continue;
                };
                for f in flags {
                    let known = h
                        .match_indices(&f)
                        .any(|(at, _)| !h[at + f.len()..].starts_with(|c: char| c.is_alphanumeric() || c == '-'));
                    if !known && f != "--help" && f != "--json" && f != "--quiet" {
                        problems.push(format!("{page}: `tunekit {}` has no flag {f}", sub.join(" ")));
                    }
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 100, "checked only {checked} flags: is the block reader broken?");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_runnable_examples_run() {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_tunekit"));
    let path = format!("{}:{}", bin.parent().unwrap().display(), std::env::var("PATH").unwrap_or_default());
    let mut ran = 0;
    for (page, text) in pages() {
        let runnable: Vec<Block> = blocks(&text).into_iter().filter(|b| b.info == "sh,run").collect();
        if runnable.is_empty() {
            continue;
        }
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(common::root().join("datasets"), dir.path().join("datasets")).unwrap();
        for b in runnable {
            let out = Command::new("bash")
                .args(["-euo", "pipefail", "-c", &b.text])
                .current_dir(dir.path())
                .env("PATH", &path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: this block failed:\n{}\n{}{}",
                page.display(),
                b.text,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            ran += 1;
        }
    }
    assert!(ran >= 8, "ran only {ran} blocks");
}

#[test]
fn the_block_reader_reads_commands_as_a_shell_would() {
    let b = "tunekit -q prepare a.jsonl --tokenizer 't ok' \\\n  --seq-len=512 # --not-a-flag\ntunekit export gguf --merge && tunekit validate openai x --model m";
    let got = invocations(b);
    assert_eq!(got[0], (vec!["prepare".to_string()], vec!["--tokenizer".to_string(), "--seq-len".into()]));
    assert_eq!(got[1], (vec!["export".to_string(), "gguf".into()], vec!["--merge".to_string()]));
    assert_eq!(got[2], (vec!["validate".to_string(), "openai".into()], vec!["--model".to_string()]));
    assert_eq!(words("a \"b c\" 'd' e\\ f"), vec!["a", "b c", "d", "e f"]);
}
