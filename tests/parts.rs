//! Sharded data preparation: `prepare` and `dedup` run as three ranks and joined by `merge-parts`
//! write exactly what one process writes (shards, manifest, rejects, duplicates, the deduplicated
//! file); a rerun keeps complete parts; a missing rank or ranks of another job are refused.

mod common;

use common::{stdout_json, tunekit};
use std::io::Write;
use std::path::Path;

/// 14,000 conversations (four batches of 4,096 rows) with exact and near duplicates of rows in
/// other batches, and a few unreadable lines.
fn corpus(path: &Path) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let words = ["river", "stone", "lamp", "orchard", "engine", "harbour", "violin", "glacier", "market", "comet"];
    let answer = |i: usize| -> String {
        (0..60).map(|k| words[(i * 7 + k * k * 3 + k * i / 5) % words.len()]).collect::<Vec<_>>().join(" ")
            + &format!(" (note {i})")
    };
    for i in 0..14_000usize {
        if i % 1000 == 999 {
            writeln!(f, "{{\"messages\": [oops").unwrap();
            continue;
        }
        let (q, a) = if i % 7 == 0 && i >= 5000 {
            (format!("Tell me about item {}", i - 5000), answer(i - 5000)) // exact duplicate
        } else if i % 11 == 0 && i >= 4100 {
            (format!("Tell me about item {}", i - 4100), answer(i - 4100).replacen("river", "brook", 1))
        // near
        } else {
            (format!("Tell me about item {i}"), answer(i))
        };
        let rec =
            serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]});
        writeln!(f, "{rec}").unwrap();
    }
}

fn ok(o: &std::process::Output) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn same_files(a: &Path, b: &Path, names: &[&str]) {
    for n in names {
        let (x, y) = (std::fs::read(a.join(n)).unwrap(), std::fs::read(b.join(n)).unwrap());
        assert!(x == y, "{n} differs between {} and {}", a.display(), b.display());
    }
}

/// A temporary folder holding the corpus as `c.jsonl`, and the tokenizer's path.
fn corpus_dir() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    corpus(&dir.path().join("c.jsonl"));
    (dir, common::root().join("datasets/tokenizers/qwen3").display().to_string())
}

#[test]
fn prepare_as_three_ranks_and_a_merge_writes_what_one_process_writes() {
    let (dir, tok) = corpus_dir();
    let args = ["prepare", "c.jsonl", "--tokenizer", &tok, "--seq-len", "256", "--eval-fraction", "0.1", "--json"];
    let one = tunekit(&[&args[..], &["--out", "one"]].concat(), dir.path());
    ok(&one);
    let s = stdout_json(&one);
    assert!(s["duplicates_exact"].as_u64().unwrap() > 500 && s["duplicates_near"].as_u64().unwrap() > 300, "{s}");
    for r in ["0", "1", "2"] {
        let o = tunekit(&[&args[..], &["--out", "three", "--rank", r, "--world-size", "3"]].concat(), dir.path());
        ok(&o);
        assert_eq!(stdout_json(&o)["kept_complete"], false);
    }
    assert!(!dir.path().join("three/manifest.json").exists(), "no manifest before the merge");
    // A rerun of a rank whose part is complete keeps it.
    let again = tunekit(&[&args[..], &["--out", "three", "--rank", "1", "--world-size", "3"]].concat(), dir.path());
    ok(&again);
    assert_eq!(stdout_json(&again)["kept_complete"], true);
    let m = tunekit(&["merge-parts", "three", "--json"], dir.path());
    ok(&m);
    let (a, b) = (dir.path().join("one"), dir.path().join("three"));
    same_files(&a, &b, &["manifest.json", "rejects.jsonl", "duplicates.jsonl"]);
    let shards: Vec<String> = std::fs::read_dir(&a)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".parquet"))
        .collect();
    assert!(shards.len() >= 2, "{shards:?}");
    same_files(&a, &b, &shards.iter().map(String::as_str).collect::<Vec<_>>());
    let merged = stdout_json(&m);
    for k in ["rows_read", "rows_kept", "rejected", "duplicates_exact", "duplicates_near", "packed_rows", "tokens"] {
        assert_eq!(merged[k], s[k], "{k}");
    }
}

#[test]
fn dedup_as_three_ranks_and_a_merge_keeps_the_same_rows() {
    let dir = tempfile::tempdir().unwrap();
    corpus(&dir.path().join("c.jsonl"));
    std::fs::create_dir_all(dir.path().join("one")).unwrap();
    std::fs::create_dir_all(dir.path().join("three")).unwrap();
    ok(&tunekit(&["dedup", "c.jsonl", "--out", "one/kept.jsonl", "-q"], dir.path()));
    for r in ["0", "1", "2"] {
        ok(&tunekit(
            &["dedup", "c.jsonl", "--out", "three/kept.jsonl", "--rank", r, "--world-size", "3", "-q"],
            dir.path(),
        ));
    }
    ok(&tunekit(&["merge-parts", "three", "-q"], dir.path()));
    same_files(
        &dir.path().join("one"),
        &dir.path().join("three"),
        &["kept.jsonl", "duplicates.jsonl", "rejects.jsonl"],
    );
}

#[test]
fn a_missing_rank_or_another_jobs_part_is_refused_at_merge() {
    let (dir, tok) = corpus_dir();
    let args = ["prepare", "c.jsonl", "--tokenizer", &tok, "--seq-len", "256", "--out", "p", "-q"];
    for r in ["0", "2"] {
        ok(&tunekit(&[&args[..], &["--rank", r, "--world-size", "3"]].concat(), dir.path()));
    }
    let o = tunekit(&["merge-parts", "p"], dir.path());
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("rank(s) 1 of 3 are missing or incomplete"), "{err}");
    assert!(!dir.path().join("p/manifest.json").exists());
    // Rank 1 run with another sequence length belongs to another job.
    ok(&tunekit(
        &[
            "prepare",
            "c.jsonl",
            "--tokenizer",
            &tok,
            "--seq-len",
            "512",
            "--out",
            "p",
            "-q",
            "--rank",
            "1",
            "--world-size",
            "3",
        ],
        dir.path(),
    ));
    let o = tunekit(&["merge-parts", "p"], dir.path());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("rank 1 of 3 ran with other inputs or options than rank 0"), "{err}");
    assert!(!dir.path().join("p/manifest.json").exists());
    // From a Slurm array task's environment.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_tunekit"))
        .args(args)
        .env("SLURM_ARRAY_TASK_ID", "1")
        .env("SLURM_ARRAY_TASK_COUNT", "3")
        .current_dir(dir.path())
        .output()
        .unwrap();
    ok(&o);
    assert!(
        tunekit(&["merge-parts", "p", "-q"], dir.path()).status.success(),
        "rank 1 redone from the array task: complete"
    );
}

#[test]
fn a_damaged_part_stops_the_merge_naming_it_and_writes_nothing() {
    let (dir, tok) = corpus_dir();
    let args = ["prepare", "c.jsonl", "--tokenizer", &tok, "--seq-len", "256", "--out", "p", "-q"];
    for r in ["0", "1", "2"] {
        ok(&tunekit(&[&args[..], &["--rank", r, "--world-size", "3"]].concat(), dir.path()));
    }
    let blocks = dir.path().join("p/parts/rank-00001-of-00003/blocks.jsonl.zst");
    let whole = std::fs::read(&blocks).unwrap();
    // Cut short (a copy that stopped), then not JSON inside (another program's file).
    std::fs::write(&blocks, &whole[..whole.len() / 2]).unwrap();
    let o = tunekit(&["merge-parts", "p"], dir.path());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("rank-00001-of-00003/blocks.jsonl.zst"), "{err}");
    assert!(!dir.path().join("p/manifest.json").exists());
    let mut z = zstd::Encoder::new(Vec::new(), 1).unwrap();
    std::io::Write::write_all(&mut z, b"not a block\n").unwrap();
    std::fs::write(&blocks, z.finish().unwrap()).unwrap();
    let o = tunekit(&["merge-parts", "p"], dir.path());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("batch 1 is unreadable"), "{err}");
    assert!(!dir.path().join("p/manifest.json").exists());
    // Its part.json still says complete, but the blocks are not the size it recorded: rerunning the rank
    // redoes the part (rather than keeping it), and the merge succeeds.
    ok(&tunekit(&[&args[..], &["--rank", "1", "--world-size", "3"]].concat(), dir.path()));
    ok(&tunekit(&["merge-parts", "p", "-q"], dir.path()));
    assert!(dir.path().join("p/manifest.json").exists());
}
