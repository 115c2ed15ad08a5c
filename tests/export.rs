//! `tunekit export openai` and `tunekit validate openai`: real data round-trips and passes
//! validation; each planted error is caught with its line and reason; token counts match tiktoken.

mod common;

use common::{read_jsonl, stdout_json, tunekit};
use serde_json::{json, Value};
use tunekit::export::tokens::{count, count_messages, Encoding};

fn export_then_validate(src: &std::path::Path, extra: &[&str]) -> (Value, Value, Vec<Value>) {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["--json", "export", "openai", src.to_str().unwrap(), "--out", "train.jsonl"];
    args.extend_from_slice(extra);
    let out = tunekit(&args, dir.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary = stdout_json(&out);
    let v = tunekit(&["--json", "validate", "openai", "train.jsonl"], dir.path());
    let report = stdout_json(&v);
    assert_eq!(v.status.code(), Some(0), "{report}");
    (summary, report, read_jsonl(&dir.path().join("train.jsonl")))
}

#[test]
fn alpaca_messages_sharegpt_and_preference_sources_export_and_validate() {
    let data = "llamafactory-0.9.5/data/";
    let Some(alpaca) = common::asset(&format!("{data}alpaca_en_demo.json")) else { return };
    let (s, r, lines) = export_then_validate(&alpaca, &[]);
    assert_eq!(s["rows_read"], 999);
    assert_eq!(
        s["rows_read"].as_u64().unwrap(),
        s["rows_kept"].as_u64().unwrap()
            + s["duplicates_exact"].as_u64().unwrap()
            + s["duplicates_near"].as_u64().unwrap()
            + s["rejected"].as_u64().unwrap()
    );
    assert_eq!(r["examples"], s["train_examples"]);
    assert_eq!(lines[0]["messages"][0]["role"], "user");
    assert_eq!(lines[0].as_object().unwrap().len(), 1, "only 'messages' on an SFT line");

    let (_, r, lines) =
        export_then_validate(&common::asset(&format!("{data}v1_sft_demo.jsonl")).unwrap(), &["--dedup", "none"]);
    assert_eq!(r["examples"], 500);
    assert_eq!(lines[0]["messages"][1]["weight"], 1);

    let (_, r, lines) =
        export_then_validate(&common::asset(&format!("{data}glaive_toolcall_en_demo.json")).unwrap(), &[]);
    assert!(r["examples"].as_u64().unwrap() > 200);
    let call = lines
        .iter()
        .flat_map(|l| l["messages"].as_array().unwrap().clone())
        .find(|m| m.get("tool_calls").is_some())
        .unwrap();
    assert!(call["tool_calls"][0]["function"]["arguments"].is_string());
    assert!(lines[0]["tools"][0]["type"] == "function");

    let (s, r, lines) =
        export_then_validate(&common::asset(&format!("{data}dpo_en_demo.json")).unwrap(), &["--method", "dpo"]);
    assert_eq!(r["kind"], "dpo");
    assert_eq!(s["rows_read"], 300);
    assert!(lines[0]["input"]["messages"].is_array());
    assert_eq!(lines[0]["preferred_output"][0]["role"], "assistant");
    assert_eq!(lines[0]["non_preferred_output"].as_array().unwrap().len(), 1);
}

#[test]
fn eval_split_has_no_near_duplicates_across_files() {
    let dir = tempfile::tempdir().unwrap();
    // 60 distinct 100-word answers, each followed by a copy with one word changed (Jaccard ~0.9).
    let vocab: Vec<String> = (0..500).map(|i| format!("w{i}")).collect();
    let mut seed = 7u64;
    let mut next = || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) as usize
    };
    let mut rows = String::new();
    for i in 0..60 {
        let words: Vec<&str> = (0..100).map(|_| vocab[next() % vocab.len()].as_str()).collect();
        let q = format!("Question {i}?");
        let a = words.join(" ");
        let mut changed = words.clone();
        changed[50] = "changed";
        rows.push_str(&json!({"prompt": q, "completion": a}).to_string());
        rows.push('\n');
        rows.push_str(&json!({"prompt": q, "completion": changed.join(" ")}).to_string());
        rows.push('\n');
    }
    std::fs::write(dir.path().join("pc.jsonl"), rows).unwrap();
    let out =
        tunekit(&["--json", "export", "openai", "pc.jsonl", "--out", "t.jsonl", "--eval-fraction", "0.3"], dir.path());
    let s = stdout_json(&out);
    assert_eq!(s["duplicates_near"], 60, "{s}");
    assert_eq!(s["train_examples"].as_u64().unwrap() + s["validation_examples"].as_u64().unwrap(), 60);
    assert!(s["validation_examples"].as_u64().unwrap() > 5);
}

#[test]
fn each_planted_error_is_reported_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let good =
        json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}).to_string();
    let mut lines: Vec<String> = vec![good.clone(); 10];
    let planted = [
        ("not json at all", "invalid_json"),
        ("[1, 2]", "data_type"),
        ("{\"prompt\": \"x\"}", "missing_messages_list"),
        ("{\"messages\": [{\"content\": \"no role\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}", "message_missing_key"),
        ("{\"messages\": [{\"role\": \"user\", \"content\": \"q\", \"mood\": \"happy\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}", "message_unrecognized_key"),
        ("{\"messages\": [{\"role\": \"customer\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}", "unrecognized_role"),
        ("{\"messages\": [{\"role\": \"user\", \"content\": \"\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}", "missing_content"),
        ("{\"messages\": [{\"role\": \"user\", \"content\": 5}, {\"role\": \"assistant\", \"content\": \"a\"}]}", "missing_content"),
        ("{\"messages\": [{\"role\": \"user\", \"content\": \"only a question\"}]}", "example_missing_assistant_message"),
        ("{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\", \"weight\": 2}]}", "invalid_weight"),
    ];
    for (p, _) in &planted {
        lines.push(p.to_string());
    }
    let huge = "word ".repeat(17_000);
    lines.push(
        json!({"messages": [{"role": "user", "content": huge}, {"role": "assistant", "content": "a"}]}).to_string(),
    );
    std::fs::write(dir.path().join("f.jsonl"), lines.join("\n") + "\n").unwrap();
    let out = tunekit(&["--json", "validate", "openai", "f.jsonl", "--model", "gpt-3.5-turbo-0125"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let r = stdout_json(&out);
    assert_eq!(r["valid"], false);
    let problems = r["problems"].as_array().unwrap();
    for (i, (_, reason)) in planted.iter().enumerate() {
        let line = 11 + i as u64;
        assert!(
            problems.iter().any(|p| p["line"] == line && p["reason"] == *reason),
            "line {line}: {reason} not reported: {problems:?}"
        );
    }
    assert!(problems.iter().any(|p| p["line"] == 21 && p["reason"] == "too_many_tokens"));
    assert_eq!(r["over_token_limit"], 1);

    // Fewer than 10 examples is an error too.
    std::fs::write(dir.path().join("few.jsonl"), format!("{good}\n").repeat(3)).unwrap();
    let out = tunekit(&["--json", "validate", "openai", "few.jsonl"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout_json(&out)["errors_by_reason"]["too_few_examples"], 1);
}

#[test]
fn token_counts_match_tiktoken() {
    // Known encodings of "hello world" in both vocabularies.
    let ids = |e| tunekit::export::tokens::bpe(e).encode_ordinary("hello world");
    assert_eq!(ids(Encoding::Cl100k), vec![15339, 1917]);
    assert_eq!(ids(Encoding::O200k), vec![24912, 2375]);
    // OpenAI's counting recipe on its own example: 129 tokens (gpt-3.5-turbo), 124 (gpt-4o).
    let msgs = json!([
        {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
        {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
        {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
        {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
        {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do better."},
        {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."},
    ]);
    let m = msgs.as_array().unwrap();
    assert_eq!(count_messages(Encoding::Cl100k, m).0, 129);
    assert_eq!(count_messages(Encoding::O200k, m).0, 124);
    assert!(count(Encoding::O200k, "日本語のテキスト") > 0);
}
