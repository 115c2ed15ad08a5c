//! Sharded data preparation: `prepare` and `dedup` run as three ranks and joined by `merge-parts`
//! write exactly what one process writes (shards, manifest, rejects, duplicates, the deduplicated
//! file); a rerun keeps complete parts; a missing rank or ranks of another job are refused; a row a
//! rank set aside as a duplicate within its share but the whole input keeps is tokenized by the merge.

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

/// Three batches for two ranks: row 0 (rank 0) is a document with one word changed; rank 1's
/// batch holds 1,500 versions of the document with three words changed (Jaccard 0.74 with it,
/// below the threshold, but sharing its band keys); row 8,192 (rank 0 again) is the document
/// itself. Rank 0 finds it a duplicate of row 0 and sets it aside untokenized; in the whole input
/// more than MAX_CHAIN versions come between the two in every band, so one process keeps it. Then
/// 8 exact copies of batch 0's rows and a near copy of the document.
fn set_aside_corpus(path: &Path) {
    let doc: Vec<String> = (0..100).map(|k| format!("word{k}")).collect();
    let row = |q: String, words: &[String]| {
        let a = words.join(" ");
        serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    };
    let changed = |positions: &[usize], tag: &str| {
        let mut w = doc.clone();
        for (n, &p) in positions.iter().enumerate() {
            w[p] = format!("{tag}x{n}");
        }
        w
    };
    let padding = |i: usize| row(format!("Question {i}"), &[format!("answer{i}")]);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    writeln!(f, "{}", row("Describe the document".into(), &changed(&[50], "y"))).unwrap();
    for i in 1..4096 {
        writeln!(f, "{}", padding(i)).unwrap();
    }
    for j in 0..4096 {
        if j < 1500 {
            let at = [10 + (j * 7) % 20, 40 + (j * 11) % 20, 70 + (j * 13) % 18];
            writeln!(f, "{}", row("Describe the document".into(), &changed(&at, &format!("v{j}")))).unwrap();
        } else {
            writeln!(f, "{}", padding(4096 + j)).unwrap();
        }
    }
    writeln!(f, "{}", row("Describe the document".into(), &doc)).unwrap();
    // Ordinary duplicates within rank 0's share: set aside, and duplicates in the whole input too.
    for i in 1..9 {
        writeln!(f, "{}", padding(i)).unwrap();
    }
    writeln!(f, "{}", row("Describe the document".into(), &changed(&[50, 51], "z"))).unwrap();
}

#[test]
fn a_row_a_rank_set_aside_that_the_whole_input_keeps_is_tokenized_by_the_merge() {
    let dir = tempfile::tempdir().unwrap();
    set_aside_corpus(&dir.path().join("c.jsonl"));
    let tok = dir.path().join("tok");
    std::fs::create_dir_all(&tok).unwrap();
    for e in std::fs::read_dir(common::root().join("datasets/tokenizers/qwen3")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tok.join(e.file_name())).unwrap();
    }
    let args = ["prepare", "c.jsonl", "--tokenizer", "tok", "--seq-len", "512", "--eval-fraction", "0.1", "--json"];
    let one = tunekit(&[&args[..], &["--out", "one"]].concat(), dir.path());
    ok(&one);
    let s = stdout_json(&one);
    assert_eq!((s["duplicates_exact"].as_u64(), s["duplicates_near"].as_u64()), (Some(8), Some(1)), "{s}");
    assert_eq!(s["rejected"], 0, "every sample fits: the document's is in the shards");
    let rank0 = tunekit(&[&args[..], &["--out", "two", "--rank", "0", "--world-size", "2"]].concat(), dir.path());
    ok(&rank0);
    assert_eq!(stdout_json(&rank0)["set_aside"], 10, "rank 0 sets the document and the copies aside");
    // (-q: ranks may differ in what they print, not in what they write.)
    ok(&tunekit(&[&args[..], &["--out", "two", "--rank", "1", "--world-size", "2", "-q"]].concat(), dir.path()));
    // The merge needs the ranks' tokenizer for that row: gone, it stops and says why.
    let (gz, moved) = (tok.join("tokenizer.json.gz"), dir.path().join("tokenizer.json.gz"));
    std::fs::rename(&gz, &moved).unwrap();
    let o = tunekit(&["merge-parts", "two"], dir.path());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("rows it keeps that a rank set aside"), "{err}");
    assert!(!dir.path().join("two/manifest.json").exists());
    // Another tokenizer.json in its place (read before the .gz) is refused too.
    let mut json = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(std::fs::File::open(&moved).unwrap()), &mut json)
        .unwrap();
    std::fs::write(tok.join("tokenizer.json"), json + "\n").unwrap();
    let o = tunekit(&["merge-parts", "two"], dir.path());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("the tokenizer changed after the ranks ran"), "{err}");
    assert!(!dir.path().join("two/manifest.json").exists());
    std::fs::remove_file(tok.join("tokenizer.json")).unwrap();
    std::fs::rename(&moved, &gz).unwrap();
    let m = tunekit(&["merge-parts", "two", "--json"], dir.path());
    ok(&m);
    assert_eq!(stdout_json(&m)["tokenized_at_merge"], 1);
    let (a, b) = (dir.path().join("one"), dir.path().join("two"));
    same_files(
        &a,
        &b,
        &["manifest.json", "duplicates.jsonl", "train-00000-of-00001.parquet", "eval-00000-of-00001.parquet"],
    );
}
