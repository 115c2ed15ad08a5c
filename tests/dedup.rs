//! `tunekit dedup` on a corpus with planted duplicates: exact copies (with case and whitespace
//! changes), copies with 1-2% of words changed, and unrelated rows sharing boilerplate.
//! Asserts recall, precision, transitivity, determinism and the accounting.

mod common;

use common::{read_jsonl, stdout_json, tunekit};
use serde_json::json;
use std::collections::HashMap;

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) as usize
    }
}

/// Returns the JSONL corpus and, for each planted copy's id, the id of its original.
fn corpus() -> (String, HashMap<String, String>, usize) {
    let mut rng = Lcg(42);
    let vocab: Vec<String> =
        (0..3000).map(|i| format!("{}{}", ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po"][i % 8], i)).collect();
    let mut text = |n: usize| -> Vec<String> { (0..n).map(|_| vocab[rng.next() % vocab.len()].clone()).collect() };
    let boiler = text(40).join(" ");
    let mut rows: Vec<(String, String)> = Vec::new(); // (prompt, answer)
    let mut truth = HashMap::new();
    let mut rng2 = Lcg(7);
    let base = 400;
    for i in 0..base {
        let len = 100 + rng2.next() % 150;
        rows.push((format!("Question {i}"), text(len).join(" ")));
    }
    let id = |k: usize| format!("c.jsonl:{}", k + 1);
    let mut planted = 0;
    for i in (0..base).step_by(4) {
        // exact copy after normalisation
        let (p, a) = rows[i].clone();
        rows.push((p.to_uppercase(), format!("  {}  ", a.replace(' ', "  "))));
        truth.insert(id(rows.len() - 1), id(i));
        planted += 1;
    }
    for i in (1..base).step_by(3) {
        // 1-2% of the words changed
        let (p, a) = rows[i].clone();
        let mut w: Vec<String> = a.split(' ').map(str::to_string).collect();
        let changes = (w.len() as f64 * (0.01 + 0.01 * (rng2.next() % 100) as f64 / 100.0)).round().max(1.0) as usize;
        for _ in 0..changes {
            let k = rng2.next() % w.len();
            w[k] = format!("changed{}", rng2.next() % 1000);
        }
        rows.push((p, w.join(" ")));
        truth.insert(id(rows.len() - 1), id(i));
        planted += 1;
    }
    for i in 0..100 {
        // unrelated rows that share boilerplate
        let t = text(80).join(" ");
        rows.push((format!("Boilerplate {i}"), format!("{boiler} {t}")));
    }
    let jsonl: String = rows.iter().map(|(p, a)| format!("{}\n", json!({"prompt": p, "completion": a}))).collect();
    (jsonl, truth, planted)
}

#[test]
fn planted_duplicates_precision_recall_and_accounting() {
    let dir = tempfile::tempdir().unwrap();
    let (jsonl, truth, planted) = corpus();
    std::fs::write(dir.path().join("c.jsonl"), jsonl).unwrap();
    let out = tunekit(&["--json", "dedup", "c.jsonl", "--out", "out/d.jsonl"], dir.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = stdout_json(&out);
    let removed = read_jsonl(&dir.path().join("out/duplicates.jsonl"));
    let correct = removed
        .iter()
        .filter(|r| truth.get(r["id"].as_str().unwrap()).map(String::as_str) == r["duplicate_of"].as_str())
        .count();
    let recall = correct as f64 / planted as f64;
    let precision = correct as f64 / removed.len().max(1) as f64;
    assert!(recall >= 0.99, "recall {recall} ({correct}/{planted})");
    assert!(precision >= 0.999, "precision {precision} ({correct}/{})", removed.len());
    assert_eq!(s["duplicates_exact"], 100);
    assert_eq!(s["rows_read"].as_u64().unwrap(), s["rows_kept"].as_u64().unwrap() + removed.len() as u64);
    assert_eq!(read_jsonl(&dir.path().join("out/d.jsonl")).len() as u64, s["rows_kept"].as_u64().unwrap());
    for r in &removed {
        let sim = r["similarity"].as_f64().unwrap();
        assert!((0.8..=1.0).contains(&sim), "{r}");
    }

    // Deterministic: a second run writes the same bytes.
    let out2 = tunekit(&["--json", "dedup", "c.jsonl", "--out", "out2/d.jsonl"], dir.path());
    assert!(out2.status.success());
    for f in ["d.jsonl", "duplicates.jsonl"] {
        assert_eq!(
            std::fs::read(dir.path().join("out").join(f)).unwrap(),
            std::fs::read(dir.path().join("out2").join(f)).unwrap()
        );
    }
}

#[test]
fn clusters_are_transitive() {
    // B differs from A in a few words, C from B in a few others: C is not similar enough to A
    // directly, but all three are one cluster and A is kept.
    let words: Vec<String> = (0..120).map(|i| format!("word{i}")).collect();
    let a = words.join(" ");
    let mut b = words.clone();
    for k in [10, 50, 90] {
        b[k] = format!("b{k}");
    }
    let mut c = b.clone();
    for k in [30, 70, 110] {
        c[k] = format!("c{k}");
    }
    let dir = tempfile::tempdir().unwrap();
    let rows = [a, b.join(" "), c.join(" ")].map(|t| format!("{}\n", json!({"text": t})));
    std::fs::write(dir.path().join("t.jsonl"), rows.concat()).unwrap();
    let out = tunekit(&["--json", "dedup", "t.jsonl", "--out", "o.jsonl", "--threshold", "0.75"], dir.path());
    let s = stdout_json(&out);
    assert_eq!(s["rows_kept"], 1, "{s}");
    let removed = read_jsonl(&dir.path().join("duplicates.jsonl"));
    assert!(removed.iter().all(|r| r["duplicate_of"] == "t.jsonl:1"), "{removed:?}");
}

#[test]
fn empty_input_dry_run_and_exact_mode() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("e.jsonl"), "").unwrap();
    let out = tunekit(&["--json", "dedup", "e.jsonl", "--out", "o.jsonl"], dir.path());
    assert!(out.status.success());
    assert_eq!(stdout_json(&out)["rows_read"], 0);
    assert_eq!(std::fs::read_to_string(dir.path().join("o.jsonl")).unwrap(), "");

    let (jsonl, _, _) = corpus();
    std::fs::write(dir.path().join("c.jsonl"), jsonl).unwrap();
    let out = tunekit(&["--json", "dedup", "c.jsonl", "--out", "dry/o.jsonl", "--dry-run"], dir.path());
    let s = stdout_json(&out);
    assert!(s["duplicates_near"].as_u64().unwrap() > 100);
    assert!(!dir.path().join("dry").exists(), "--dry-run writes nothing");
    let out = tunekit(&["--json", "dedup", "c.jsonl", "--out", "x/o.jsonl", "--dedup", "exact"], dir.path());
    let s = stdout_json(&out);
    assert_eq!(s["duplicates_near"], 0);
    assert_eq!(s["duplicates_exact"], 100);
}

#[test]
fn keep_longest_keeps_the_longest_member_of_each_cluster() {
    let words: Vec<String> = (0..150).map(|i| format!("w{i}")).collect();
    let short = words[..140].join(" ");
    let long = words.join(" ");
    let dir = tempfile::tempdir().unwrap();
    let rows = [short.as_str(), long.as_str(), "something else entirely, with its own words"]
        .map(|t| format!("{}\n", json!({"text": t})));
    std::fs::write(dir.path().join("t.jsonl"), rows.concat()).unwrap();
    let first = stdout_json(&tunekit(&["--json", "dedup", "t.jsonl", "--out", "f/o.jsonl"], dir.path()));
    let out = tunekit(&["--json", "dedup", "t.jsonl", "--out", "l/o.jsonl", "--keep", "longest"], dir.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let longest = stdout_json(&out);
    assert_eq!(first["rows_kept"], 2);
    assert_eq!(longest["rows_kept"], 2);
    assert_eq!(longest["duplicates_near"], 1);
    let kept: Vec<String> =
        read_jsonl(&dir.path().join("l/o.jsonl")).iter().map(|r| r["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(kept, vec!["t.jsonl:2", "t.jsonl:3"], "the longer row of the pair stays, in input order");
    let d = read_jsonl(&dir.path().join("l/duplicates.jsonl"));
    assert_eq!(d[0]["id"], "t.jsonl:1");
    assert_eq!(d[0]["duplicate_of"], "t.jsonl:2");

    // On the planted corpus the accounting still adds up and every duplicate points at a kept row.
    let (jsonl, _, _) = corpus();
    std::fs::write(dir.path().join("c.jsonl"), jsonl).unwrap();
    let s =
        stdout_json(&tunekit(&["--json", "dedup", "c.jsonl", "--out", "c/o.jsonl", "--keep", "longest"], dir.path()));
    let kept: std::collections::HashSet<String> =
        read_jsonl(&dir.path().join("c/o.jsonl")).iter().map(|r| r["id"].as_str().unwrap().to_string()).collect();
    let dups = read_jsonl(&dir.path().join("c/duplicates.jsonl"));
    assert_eq!(s["rows_read"].as_u64().unwrap(), kept.len() as u64 + dups.len() as u64);
    assert!(dups.iter().all(|r| kept.contains(r["duplicate_of"].as_str().unwrap())));
}
