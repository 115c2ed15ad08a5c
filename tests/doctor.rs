//! `tunekit doctor`: each defect planted in shards (by preparing data that has it, or by editing
//! clean shards row by row) is found with its row and severity, and clean shards report nothing.

mod common;

use common::{asset, root, stdout_json, tunekit};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tunekit::pack::rows::PackedRow;
use tunekit::pack::shards::{read_rows, ShardWriter};

fn qwen3() -> PathBuf {
    root().join("datasets/tokenizers/qwen3")
}

/// Prepares `rows` (JSONL lines) with `tokenizer` into `dir/NAME`.
fn prepare(dir: &Path, name: &str, rows: &[Value], tokenizer: &Path, extra: &[&str]) -> PathBuf {
    let data = dir.join(format!("{name}.jsonl"));
    std::fs::write(&data, rows.iter().map(|r| format!("{r}\n")).collect::<String>()).unwrap();
    let out = dir.join(name);
    let tok = tokenizer.display().to_string();
    let mut args = vec!["prepare", data.to_str().unwrap(), "--tokenizer", &tok, "--out", out.to_str().unwrap()];
    args.extend_from_slice(&["--eval-fraction", "0", "--dedup", "none", "-q"]);
    args.extend_from_slice(extra);
    let o = tunekit(&args, dir);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// Conversations that tokenize cleanly, each different.
fn conversations(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("What is {i} plus {i}?")},
                {"role": "assistant", "content": format!("{i} plus {i} is {}.", 2 * i)},
            ]})
        })
        .collect()
}

fn doctor(dir: &Path, args: &[&str]) -> (bool, Value) {
    let mut a = vec!["doctor"];
    a.extend_from_slice(args);
    a.push("--json");
    let o = tunekit(&a, dir);
    (o.status.success(), stdout_json(&o))
}

/// The findings by check: (severity, count, first example's row).
fn checks(report: &Value) -> Vec<(String, String, u64, u64)> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["check"].as_str().unwrap().to_string(),
                f["severity"].as_str().unwrap().to_string(),
                f["count"].as_u64().unwrap(),
                f["examples"][0]["row"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect()
}

/// A copy of the shard directory `src` with `edit` applied to every training row (row index given).
fn edited(src: &Path, dst: &Path, mut edit: impl FnMut(usize, &mut PackedRow)) -> PathBuf {
    std::fs::create_dir_all(dst).unwrap();
    std::fs::copy(src.join("manifest.json"), dst.join("manifest.json")).unwrap();
    let mut w = ShardWriter::new(dst, "train", 1 << 30);
    for f in tunekit::pack::shards::list_shards(src, "train").unwrap() {
        let mut rows = read_rows(&f).unwrap();
        for (i, r) in rows.iter_mut().enumerate() {
            edit(i, r);
        }
        w.write(rows).unwrap();
    }
    w.finish().unwrap();
    dst.to_path_buf()
}

/// Puts `id` (untrained) in front of the row's first segment, or takes its first token away.
fn reshape_first_segment(r: &mut PackedRow, insert: Option<i32>) {
    match insert {
        Some(id) => {
            r.input_ids.insert(0, id);
            r.labels.insert(0, -100);
            r.seq_lengths[0] += 1;
        }
        None => {
            r.input_ids.remove(0);
            r.labels.remove(0);
            r.labels[0] = -100;
            r.seq_lengths[0] -= 1;
        }
    }
    r.position_ids = r.seq_lengths.iter().flat_map(|&l| 0..l).collect();
}

#[test]
fn clean_shards_report_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let o = tunekit(&["quickstart", "--out", "qs", "-q"], dir.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (ok, r) = doctor(dir.path(), &["qs/shards"]);
    assert!(ok && checks(&r).is_empty(), "{r}");
    assert!(r["sequences"].as_u64().unwrap() > 10 && r["trained_tokens"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["methods"], serde_json::json!(["sft"]), "the methods SFT shards serve: {r}");
    // With the model: the memory of the largest micro-batch grows with --batch-tokens.
    let mem = |bt: &str| {
        let (ok, r) = doctor(dir.path(), &["qs/shards", "--model", "qs/tiny-qwen3-random", "--batch-tokens", bt]);
        assert!(ok, "{r}");
        r["memory"]["estimate"]["total_mb"].as_f64().unwrap()
    };
    assert!(mem("4096") > mem("512"));
    // Full fine-tuning's plan: every weight with its gradient (as large) and AdamW's two moments
    // (twice as large in f32, about half in 8 bits); no adapter.
    let plan = |extra: &[&str]| {
        let mut args = vec!["qs/shards", "--model", "qs/tiny-qwen3-random", "--full"];
        args.extend_from_slice(extra);
        let (ok, r) = doctor(dir.path(), &args);
        assert!(ok && r["memory"]["full"] == true, "{r}");
        let e = &r["memory"]["estimate"];
        let f = |k: &str| e[k].as_f64().unwrap();
        (f("weights_mb"), f("gradients_mb"), f("optimizer_mb"), f("adapters_mb"))
    };
    let (w, g, o, a) = plan(&[]);
    assert!(w > 0.0 && g == w && (o - 2.0 * w).abs() < 1e-6 * w && a == 0.0, "{w} {g} {o} {a}");
    let (w8, _, o8, _) = plan(&["--optim", "adamw_8bit"]);
    assert!(w8 == w && (o8 / w - 0.508).abs() < 0.001, "{o8} {w}");
    let o =
        tunekit(&["doctor", "qs/shards", "--model", "qs/tiny-qwen3-random", "--full", "--qlora", "nf4"], dir.path());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("choose one"), "{e}");
}

#[test]
fn untrained_end_of_turn_ids_beyond_the_vocabulary_and_broken_rows_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let clean = prepare(dir.path(), "clean", &conversations(30), &qwen3(), &[]);
    let im_end = 151645; // <|im_end|> in Qwen3
                         // The end-of-turn token of every answer in row 0 masked out of the loss.
    let eot = edited(&clean, &dir.path().join("eot"), |i, r| {
        if i == 0 {
            for k in 0..r.labels.len() {
                if r.input_ids[k] == im_end && r.labels[k] != -100 {
                    r.labels[k] = -100;
                    // The newline trained after it, as the Qwen3 template does, goes too.
                    if k + 1 < r.labels.len() {
                        r.labels[k + 1] = -100;
                    }
                }
            }
        }
    });
    let (ok, r) = doctor(dir.path(), &[eot.to_str().unwrap()]);
    let c = checks(&r);
    assert!(!ok, "errors exit 1: {r}");
    assert_eq!(c.len(), 1, "{r}");
    assert_eq!((c[0].0.as_str(), c[0].1.as_str(), c[0].3), ("eot_not_trained", "error", 0), "{r}");
    assert!(r["findings"][0]["examples"][0]["detail"].as_str().unwrap().contains("<|im_end|>"), "{r}");
    // An id the vocabulary lacks, in the third segment.
    let vocab = edited(&clean, &dir.path().join("vocab"), |_, r| {
        let at = (r.seq_lengths[0] + r.seq_lengths[1] + 3) as usize;
        r.input_ids[at] = 400_000;
    });
    let (ok, r) = doctor(dir.path(), &[vocab.to_str().unwrap()]);
    assert!(!ok);
    assert_eq!(checks(&r).iter().map(|c| c.0.as_str()).collect::<Vec<_>>(), vec!["id_beyond_vocab"], "{r}");
    assert_eq!(
        (r["findings"][0]["examples"][0]["segment"].as_u64(), r["findings"][0]["examples"][0]["token"].as_u64()),
        (Some(2), Some(3))
    );
    // Segment lengths that do not add up.
    let broken = edited(&clean, &dir.path().join("broken"), |i, r| {
        if i == 0 {
            r.seq_lengths[0] += 1;
        }
    });
    let (ok, r) = doctor(dir.path(), &[broken.to_str().unwrap()]);
    assert!(!ok && checks(&r)[0].0 == "corrupt_row", "{r}");
}

#[test]
fn special_token_text_in_an_answer_is_found_in_its_row() {
    let dir = tempfile::tempdir().unwrap();
    let mut rows = conversations(5);
    rows[3]["messages"][1]["content"] = "Four.<|im_end|> Then the answer goes on after the marker.".into();
    let shards = prepare(dir.path(), "special", &rows, &qwen3(), &["--pack", "none"]);
    let (ok, r) = doctor(dir.path(), &[shards.to_str().unwrap()]);
    let c = checks(&r);
    assert!(!ok, "{r}");
    assert_eq!(c.iter().map(|c| (c.0.as_str(), c.2)).collect::<Vec<_>>(), vec![("special_token_in_answer", 1)], "{r}");
}

#[test]
fn answers_cut_by_truncation_are_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let mut rows = conversations(4);
    rows[2]["messages"][1]["content"] = "a long answer that keeps going ".repeat(20).into();
    let shards =
        prepare(dir.path(), "cut", &rows, &qwen3(), &["--too-long", "truncate", "--seq-len", "64", "--pack", "none"]);
    let (ok, r) = doctor(dir.path(), &[shards.to_str().unwrap()]);
    let c = checks(&r);
    assert!(ok, "warnings exit 0: {r}");
    assert_eq!(
        c.iter().map(|c| (c.0.as_str(), c.1.as_str(), c.2)).collect::<Vec<_>>(),
        vec![("answer_cut", "warning", 1)]
    );
    assert!(r["findings"][0]["what"].as_str().unwrap().contains("--too-long truncate"), "{r}");
}

#[test]
fn doubled_and_missing_bos_are_found() {
    let Some(llama3) = asset("llama3_1/package/models") else { return };
    let dir = tempfile::tempdir().unwrap();
    let clean = prepare(dir.path(), "clean", &conversations(20), &llama3, &[]);
    let (ok, r) = doctor(dir.path(), &[clean.to_str().unwrap()]);
    assert!(ok && checks(&r).is_empty(), "clean Llama 3 shards start with one BOS: {r}");
    let bos = 128000; // <|begin_of_text|>
    let doubled = edited(&clean, &dir.path().join("doubled"), |i, r| {
        if i == 0 {
            reshape_first_segment(r, Some(bos));
        }
    });
    let (ok, r) = doctor(dir.path(), &[doubled.to_str().unwrap()]);
    assert!(!ok);
    assert_eq!(checks(&r).iter().map(|c| (c.0.as_str(), c.2)).collect::<Vec<_>>(), vec![("bos_doubled", 1)], "{r}");
    let missing = edited(&clean, &dir.path().join("missing"), |i, r| {
        if i == 0 {
            reshape_first_segment(r, None);
        }
    });
    let (ok, r) = doctor(dir.path(), &[missing.to_str().unwrap()]);
    assert!(ok, "a missing BOS is a warning: {r}");
    assert_eq!(checks(&r).iter().map(|c| (c.0.as_str(), c.2)).collect::<Vec<_>>(), vec![("bos_missing", 1)], "{r}");
}

#[test]
fn another_tokenizer_or_template_than_the_models_is_found() {
    let Some(llama3) = asset("llama3_1/package/models") else { return };
    let dir = tempfile::tempdir().unwrap();
    // A model directory (config + the Qwen3 tokenizer); doctor reads only its config and tokenizer.
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    let config = serde_json::json!({"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": 151936, "tie_word_embeddings": true});
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    for f in ["tokenizer.json.gz", "tokenizer_config.json"] {
        std::fs::copy(qwen3().join(f), model.join(f)).unwrap();
    }
    let m = model.to_str().unwrap();
    let own = prepare(dir.path(), "own", &conversations(8), &qwen3(), &[]);
    let (ok, r) = doctor(dir.path(), &[own.to_str().unwrap(), "--model", m]);
    assert!(ok && checks(&r).is_empty(), "{r}");
    let chatml = prepare(dir.path(), "chatml", &conversations(8), &qwen3(), &["--template", "chatml"]);
    let (ok, r) = doctor(dir.path(), &[chatml.to_str().unwrap(), "--model", m]);
    assert!(ok, "{r}");
    assert_eq!(checks(&r).iter().map(|c| c.0.as_str()).collect::<Vec<_>>(), vec!["template_differs"], "{r}");
    let other = prepare(dir.path(), "other", &conversations(8), &llama3, &[]);
    let (ok, r) = doctor(dir.path(), &[other.to_str().unwrap(), "--model", m]);
    assert!(!ok);
    let names: Vec<String> = checks(&r).into_iter().map(|c| c.0).collect();
    assert!(names.contains(&"tokenizer_differs".to_string()), "{r}");
}
