//! `tunekit prepare` end to end: shard schema, packing invariants, accounting, determinism,
//! too-long handling and bad input.

mod common;

use common::{read_jsonl, stdout_json, tunekit};
use serde_json::{json, Value};
use std::path::Path;
use tunekit::pack::shards::{list_shards, read_rows};

fn prepare(dir: &Path, args: &[&str]) -> (std::process::Output, Value) {
    let tok = common::root().join("datasets/tokenizers/qwen3");
    let mut a = vec!["--json", "prepare", "--tokenizer", tok.to_str().unwrap()];
    a.extend_from_slice(args);
    let out = tunekit(&a, dir);
    let v = if out.status.success() { stdout_json(&out) } else { Value::Null };
    (out, v)
}

fn sample_inputs() -> Vec<String> {
    let ds = common::root().join("datasets");
    ["support_chats.jsonl", "alpaca_sample.json", "sharegpt_sample.json"]
        .iter()
        .map(|f| ds.join(f).display().to_string())
        .collect()
}

#[test]
fn shards_have_the_contract_schema_and_packing_invariants() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = sample_inputs();
    let mut args: Vec<&str> = inputs.iter().map(String::as_str).collect();
    args.extend(["--out", "shards", "--seq-len", "256", "--eval-fraction", "0.2"]);
    let (out, s) = prepare(dir.path(), &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shards = dir.path().join("shards");
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(shards.join("manifest.json")).unwrap()).unwrap();
    let a = &manifest["accounting"];
    let n = |v: &Value| v.as_u64().unwrap();
    assert_eq!(n(&a["rows_read"]), 29);
    assert_eq!(
        n(&a["rows_read"]),
        n(&a["samples"]) + n(&a["rejected"]) + n(&a["duplicates_exact"]) + n(&a["duplicates_near"])
    );
    assert_eq!(n(&a["duplicates_exact"]), 1);
    assert_eq!(n(&a["duplicates_near"]), 2, "password reset + houseplants");
    assert_eq!(manifest["template"]["name"], "tokenizer");
    assert_eq!(manifest["tokenizer"]["vocab_size"], 151669);
    assert!(manifest["sources"][0]["sha256"].as_str().unwrap().len() == 64);
    assert_eq!(s["samples"], a["samples"]);

    // Schema in pyarrow terms: four list<int32> columns.
    let train = list_shards(&shards, "train").unwrap();
    assert_eq!(train.len(), 1);
    assert!(train[0].file_name().unwrap().to_string_lossy().ends_with("-of-00001.parquet"));
    let f = std::fs::File::open(&train[0]).unwrap();
    let b = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f).unwrap();
    let schema = b.schema();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["input_ids", "labels", "position_ids", "seq_lengths"]);
    for f in schema.fields() {
        assert_eq!(format!("{}", f.data_type()), "List(Int32)", "{}", f.name());
    }

    let mut segments = 0u64;
    let mut tokens = 0u64;
    for split in ["train", "eval"] {
        for path in list_shards(&shards, split).unwrap() {
            for r in read_rows(&path).unwrap() {
                assert!(r.input_ids.len() <= 256);
                assert_eq!(r.labels.len(), r.input_ids.len());
                assert_eq!(r.position_ids.len(), r.input_ids.len());
                assert_eq!(r.seq_lengths.iter().sum::<i32>() as usize, r.input_ids.len());
                let mut at = 0usize;
                for &len in &r.seq_lengths {
                    assert_eq!(r.labels[at], -100, "no label at a segment start");
                    for k in 0..len as usize {
                        assert_eq!(r.position_ids[at + k], k as i32, "positions restart at each segment");
                    }
                    // each segment is one whole sample: its last trained token is the end of turn
                    let seg = at..at + len as usize;
                    let last = seg.clone().rev().find(|&i| r.labels[i] != -100).expect("trained tokens");
                    assert_eq!(r.input_ids[last], 151645, "last trained token is <|im_end|>");
                    at += len as usize;
                }
                segments += r.seq_lengths.len() as u64;
                tokens += r.input_ids.len() as u64;
            }
        }
    }
    assert_eq!(segments, n(&a["samples"]), "no sample split across rows");
    assert_eq!(tokens, n(&a["tokens"]));
    assert!(n(&manifest["splits"]["eval"]["samples"]) > 0);
    assert!(a["fill_ratio"].as_f64().unwrap() > 0.5);
}

#[test]
fn same_input_same_options_give_identical_shards() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = sample_inputs();
    for out in ["a", "b"] {
        let mut args: Vec<&str> = inputs.iter().map(String::as_str).collect();
        args.extend(["--out", out, "--seq-len", "128", "--seed", "3"]);
        assert!(prepare(dir.path(), &args).0.status.success());
    }
    for f in ["train-00000-of-00001.parquet", "manifest.json", "duplicates.jsonl"] {
        let (x, y) = (
            std::fs::read(dir.path().join("a").join(f)).unwrap(),
            std::fs::read(dir.path().join("b").join(f)).unwrap(),
        );
        if f == "manifest.json" {
            let strip = |b: &[u8]| String::from_utf8_lossy(b).replace("\"b\"", "\"a\"").replace("/b\"", "/a\"");
            assert_eq!(strip(&x), strip(&y));
        } else {
            assert_eq!(x, y, "{f} differs between identical runs");
        }
    }
}

#[test]
fn too_long_samples_are_dropped_or_truncated_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let long = "word ".repeat(300);
    let rows = [
        json!({"prompt": "short question", "completion": "short answer"}),
        json!({"prompt": "long answer please", "completion": long}),
        json!({"prompt": long, "completion": "the prompt alone is too long"}),
    ];
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(dir.path().join("l.jsonl"), text).unwrap();
    let (out, s) = prepare(dir.path(), &["l.jsonl", "--out", "drop", "--seq-len", "64", "--eval-fraction", "0"]);
    assert!(out.status.success());
    assert_eq!(s["dropped_too_long"], 2);
    assert_eq!(s["samples"], 1);
    assert_eq!(s["rejected_by_reason"]["too_long"], 2);
    let (out, s) = prepare(
        dir.path(),
        &["l.jsonl", "--out", "trunc", "--seq-len", "64", "--eval-fraction", "0", "--too-long", "truncate"],
    );
    assert!(out.status.success());
    assert_eq!(s["truncated"], 1);
    assert_eq!(s["samples"], 2);
    assert_eq!(s["rejected_by_reason"]["prompt_too_long"], 1);
    let rejects = read_jsonl(&dir.path().join("trunc/rejects.jsonl"));
    assert_eq!(rejects[0]["row"], 3);
}

#[test]
fn bad_tokenizer_and_failing_template_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.jsonl"), "{\"prompt\": \"q\", \"completion\": \"a\"}\n").unwrap();
    std::fs::write(dir.path().join("not_a_tokenizer.json"), "{\"hello\": 1}").unwrap();
    let out = tunekit(&["prepare", "c.jsonl", "--out", "o", "--tokenizer", "not_a_tokenizer.json"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a Hugging Face tokenizer.json"));
    let out = tunekit(&["prepare", "c.jsonl", "--out", "o", "--tokenizer", "missing/tokenizer.json"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));

    // The mistral template refuses tool messages: that conversation is rejected, the rest go on.
    let rows = [
        json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
        json!({"messages": [{"role": "user", "content": "q2"}, {"role": "tool", "content": "{}"}, {"role": "assistant", "content": "a2"}]}),
    ];
    std::fs::write(dir.path().join("m.jsonl"), rows.iter().map(|r| format!("{r}\n")).collect::<String>()).unwrap();
    let (out, s) = prepare(dir.path(), &["m.jsonl", "--out", "m", "--template", "mistral", "--eval-fraction", "0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(s["rejected_by_reason"]["chat_template_error"], 1);
    let r = read_jsonl(&dir.path().join("m/rejects.jsonl"));
    assert!(r[0]["detail"].as_str().unwrap().contains("only system, user and assistant"), "{}", r[0]);
    assert!(!dir.path().join("m/train-00000-of-00001.parquet").exists() || s["samples"] == 1);
}

#[test]
fn preference_pairs_become_preference_shards() {
    let dir = tempfile::tempdir().unwrap();
    let src = common::root().join("datasets/preferences.jsonl");
    let (out, s) =
        prepare(dir.path(), &[src.to_str().unwrap(), "--method", "preference", "--out", "pp", "--eval-fraction", "0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(s["samples"], 3);
    assert_eq!(s["method"], "preference");
    let pairs = tunekit::pack::preference::read_pairs(&dir.path().join("pp/train-00000-of-00001.parquet")).unwrap();
    assert_eq!(pairs.len(), 3);
    let answers: usize =
        pairs.iter().map(|p| p.chosen_labels.iter().chain(&p.rejected_labels).filter(|&&l| l != -100).count()).sum();
    assert_eq!(s["trainable_tokens"], answers, "the summary counts the answer tokens of both sides");
    for p in &pairs {
        // The two sides share the prompt and differ in the answer; only the answer is trained,
        // ending with <|im_end|>.
        let first_trained = |l: &[i32]| l.iter().position(|&x| x != -100).unwrap();
        let (c0, r0) = (first_trained(&p.chosen_labels), first_trained(&p.rejected_labels));
        assert_eq!(c0, r0);
        assert_eq!(p.chosen_input_ids[..c0], p.rejected_input_ids[..r0]);
        for (ids, labels) in [(&p.chosen_input_ids, &p.chosen_labels), (&p.rejected_input_ids, &p.rejected_labels)] {
            let last = labels.iter().rposition(|&x| x != -100).unwrap();
            assert_eq!(ids[last], 151645);
            assert!(labels[..c0].iter().all(|&x| x == -100));
        }
    }
    // A row that is not a pair is rejected with a reason (and a run that keeps none exits 1 saying so).
    std::fs::write(dir.path().join("sft.jsonl"), "{\"prompt\": \"q\", \"completion\": \"a\"}\n").unwrap();
    let (out, _) = prepare(dir.path(), &["sft.jsonl", "--method", "preference", "--out", "p2", "--eval-fraction", "0"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("prepare kept none of the 1 row(s)") && err.contains("not_a_preference_pair: 1"), "{err}");
}

/// `prepare --method kto`: rows with a desirability label (a boolean, yes/no, 1/0) become one row
/// each, preference pairs two (chosen desirable, rejected not, one prompt); only the final answer is
/// trained; a row without a label or with a label that is not one is rejected with its reason, and
/// the counts add up. llamafactory's kto_en_demo.json (messages + label) reads as it is.
#[test]
fn labelled_rows_and_split_pairs_become_kto_shards() {
    let dir = tempfile::tempdir().unwrap();
    let turn = |q: &str, a: &str| json!([{"role": "user", "content": q}, {"role": "assistant", "content": a}]);
    let rows = [
        json!({"messages": turn("What is 2+2?", "4"), "label": true}),
        json!({"messages": turn("Capital of France?", "Berlin"), "label": "no"}),
        json!({"messages": turn("Say hi", "hi"), "label": 1}),
        json!({"messages": turn("Unlabelled", "row")}),
        json!({"messages": turn("Odd label", "row"), "label": "maybe"}),
    ];
    std::fs::write(dir.path().join("l.jsonl"), rows.iter().map(|r| format!("{r}\n")).collect::<String>()).unwrap();
    let pairs = common::root().join("datasets/preferences.jsonl");
    let args = ["l.jsonl", pairs.to_str().unwrap(), "--method", "kto", "--out", "k", "--eval-fraction", "0"];
    let (out, s) = prepare(dir.path(), &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(s["method"], "kto");
    assert_eq!((s["samples"].as_u64(), s["desirable"].as_u64()), (Some(3 + 6), Some(2 + 3)), "{s}");
    assert_eq!(s["rejected_by_reason"], json!({"not_labelled": 1, "wrong_type": 1}));
    let m: Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("k/manifest.json")).unwrap()).unwrap();
    assert_eq!(m["format"], "tunekit-unpaired-shards");
    let a = &m["accounting"];
    assert_eq!((a["rows_read"].as_u64(), a["rejected"].as_u64()), (Some(8), Some(2)));
    assert_eq!((a["desirable"].as_u64(), a["undesirable"].as_u64()), (Some(5), Some(4)));
    let r = read_jsonl(&dir.path().join("k/rejects.jsonl"));
    assert!(r.iter().any(|x| x["detail"].as_str().unwrap().contains("--map label=COLUMN")), "{r:?}");
    let got = tunekit::pack::unpaired::read_unpaired(&dir.path().join("k/train-00000-of-00001.parquet")).unwrap();
    assert_eq!(got.len(), 9);
    for row in &got {
        // The prompt untrained, the answer trained to its <|im_end|>.
        let p = row.prompt_len();
        assert!(p > 0 && row.labels[..p].iter().all(|&l| l == -100));
        let last = row.labels.iter().rposition(|&l| l != -100).unwrap();
        assert_eq!(row.input_ids[last], 151645);
    }
    // A pair's halves share their prompt: one desirable, one not.
    let halves: Vec<_> = got
        .iter()
        .filter(|r| got.iter().filter(|o| o.input_ids[..o.prompt_len()] == r.input_ids[..r.prompt_len()]).count() == 2)
        .collect();
    assert_eq!(halves.len(), 6);
    assert_eq!(halves.iter().filter(|r| r.desirable).count(), 3);

    let Some(demo) = common::asset("llamafactory-0.9.5/data/kto_en_demo.json") else { return };
    let (out, s) =
        prepare(dir.path(), &[demo.to_str().unwrap(), "--method", "kto", "--out", "demo", "--eval-fraction", "0.1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let n = |k: &str| s[k].as_u64().unwrap();
    assert_eq!(n("rows_read"), n("rows_kept") + n("rejected") + n("duplicates_exact") + n("duplicates_near"), "{s}");
    assert_eq!(n("samples"), n("rows_kept"));
    assert!(n("desirable") > 100 && n("samples") - n("desirable") > 100, "{s}");
}

#[test]
fn quickstart_runs_the_whole_path() {
    let dir = tempfile::tempdir().unwrap();
    let out = tunekit(&["--json", "quickstart", "--out", dir.path().join("qs").to_str().unwrap()], &common::root());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = stdout_json(&out);
    assert_eq!(s["convert"]["rows_read"], 33);
    assert!(s["prepare"]["duplicates_near"].as_u64().unwrap() >= 2);
    assert_eq!(s["validate"]["valid"], true);
    assert!(s["train"]["final_loss"].as_f64().unwrap() < s["train"]["first_loss"].as_f64().unwrap());
    assert!(dir.path().join("qs/lora/adapter_model.safetensors").exists());
    assert!(dir.path().join("qs/shards/manifest.json").exists());
}

#[test]
fn a_second_prepare_into_the_same_directory_is_refused_and_names_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = sample_inputs();
    let mut args: Vec<&str> = inputs.iter().map(String::as_str).collect();
    args.extend(["--out", "shards"]);
    // A prepare still writing `shards` (this process holds its lock as that run would).
    let held = tunekit::output::DirLock::acquire(&dir.path().join("shards"), "tunekit prepare").unwrap();
    let (out, _) = prepare(dir.path(), &args);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is being written by tunekit prepare") && err.contains(&std::process::id().to_string()),
        "{err}"
    );
    assert!(!dir.path().join("shards/manifest.json").exists(), "the refused run wrote nothing");
    drop(held);
    let (out, s) = prepare(dir.path(), &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(s["rows_kept"].as_u64().unwrap() > 0);
    assert!(!dir.path().join("shards").join(tunekit::output::LOCK_FILE).exists());
}
