//! Online RL end to end on the tiny Llama fixture: prompt shards from text, GRPO and PPO runs that
//! log their rollouts and resume bit for bit, and the bad inputs the issue names: a reward command that
//! crashes, hangs or prints something that is not a number, a reward model that does not fit the
//! policy, prompts longer than the limit, data that are not prompt shards.

mod common;

use common::{stdout_json, tunekit};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn model() -> PathBuf {
    common::root().join("tests/fixtures/train/llama")
}

fn rl_args<'a>(method: &'a str, data: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "--json",
        "train",
        "--method",
        method,
        "--model",
        "",
        "--data",
        data,
        "--out",
        out,
        "--prompts-per-step",
        "2",
        "--num-generations",
        "3",
        "--max-completion-tokens",
        "6",
        "--lr",
        "1e-2",
        "--eval-every",
        "2",
        "--seed",
        "3",
    ];
    a.extend_from_slice(extra);
    a
}

fn train(dir: &Path, args: Vec<&str>) -> std::process::Output {
    let m = model();
    let args: Vec<&str> = args.into_iter().map(|a| if a.is_empty() { m.to_str().unwrap() } else { a }).collect();
    tunekit(&args, dir)
}

#[test]
fn prompt_shards_keep_the_rows_columns() {
    let dir = tempfile::tempdir().unwrap();
    let p = common::prompt_shards(dir.path());
    let m: Value = serde_json::from_slice(&std::fs::read(p.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["format"], "tunekit-prompt-shards");
    assert_eq!(m["columns"], serde_json::json!(["id", "prompt_ids", "answer", "prompt"]));
    let rows = tunekit::pack::prompts::read_prompts(&p.join("train-00000-of-00001.parquet")).unwrap();
    assert!(rows.iter().all(|r| r.columns.contains_key("answer") && r.prompt_ids.len() <= 16));
    // Rendered with the template: the prompt's words are its ids.
    let first: Vec<i32> = rows[0].columns["prompt"].split(' ').map(|w| w[1..].parse().unwrap()).collect();
    assert_eq!(rows[0].prompt_ids, first);
}

#[test]
fn grpo_logs_its_rollouts_and_resumes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    common::prompt_shards(dir.path());
    let extra = ["--reward", "regex:t5", "--reward", "length:3*0.5", "--beta", "0.04", "--num-iterations", "2"];
    let out = train(
        dir.path(),
        rl_args("grpo", "p", "a", &[&extra[..], &["--max-steps", "6", "--save-every", "3"]].concat()),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = stdout_json(&out);
    assert_eq!(s["method"], "grpo");
    assert!(s["final_eval"]["reward"].is_number(), "held-out mean reward: {s}");
    let lines = common::read_jsonl(&dir.path().join("a/rollouts.jsonl"));
    assert_eq!(lines.len(), 3 * 2 * 3, "3 rollouts (2 iterations each) of 2 prompts x 3 completions");
    for l in &lines {
        assert!(l["completion"].is_string() && l["rewards"]["regex:t5"].is_number() && l["advantage"].is_number());
    }
    let metrics = common::read_jsonl(&dir.path().join("a/metrics.jsonl"));
    let last = metrics.last().unwrap();
    for k in [
        "reward",
        "reward_std",
        "rewards/regex:t5/mean",
        "frac_reward_zero_std",
        "completions/mean_length",
        "completions/clipped_ratio",
        "kl",
        "entropy",
        "clip_ratio/region_mean",
        "step_time",
        "gen_tokens_per_s",
        "eval_reward",
    ] {
        assert!(last.get(k).is_some(), "metrics lack {k}: {last}");
    }
    // Stopped after the checkpoint at step 3 (mid-way through a rollout's iterations) and resumed.
    let out = train(
        dir.path(),
        rl_args("grpo", "p", "b", &[&extra[..], &["--max-steps", "6", "--resume", "a/checkpoint-3"]].concat()),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        std::fs::read(dir.path().join("a/adapter_model.safetensors")).unwrap(),
        std::fs::read(dir.path().join("b/adapter_model.safetensors")).unwrap(),
        "the resumed run samples and learns exactly as the uninterrupted one"
    );
}

/// GSPO's sequence-level ratios with truncated completions left out of the loss, through the binary
/// (the numerics are TRL's: train_parity's grpo test); max 6 tokens cuts some completions.
#[test]
fn gspo_with_truncated_completions_masked_trains() {
    let dir = tempfile::tempdir().unwrap();
    common::prompt_shards(dir.path());
    let extra = ["--reward", "regex:t5", "--beta", "0.04", "--num-iterations", "2", "--loss-type", "grpo"];
    let gspo = ["--importance-sampling-level", "sequence", "--mask-truncated-completions", "--max-steps", "4"];
    let out = train(dir.path(), rl_args("grpo", "p", "g", &[&extra[..], &gspo[..]].concat()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let metrics = common::read_jsonl(&dir.path().join("g/metrics.jsonl"));
    let clipped = metrics.iter().filter_map(|m| m["completions/clipped_ratio"].as_f64()).fold(0.0, f64::max);
    assert!(clipped > 0.0, "some completions were cut, so the mask had work: {metrics:?}");
    assert!(metrics.iter().all(|m| m["loss"].as_f64().is_none_or(f64::is_finite)));
}

/// RLOO through the binary: KL-penalised rewards and leave-one-out advantages on the GRPO rollout
/// engine (numerics: train_parity's grpo/rloo test), TRL's metrics logged, resumed bit for bit; one
/// completion per prompt has no leave-one-out baseline and is refused before loading the model.
#[test]
fn rloo_trains_resumes_bit_for_bit_and_needs_two_generations() {
    let dir = tempfile::tempdir().unwrap();
    common::prompt_shards(dir.path());
    let extra = ["--reward", "regex:t5", "--max-steps", "4"];
    let out = train(dir.path(), rl_args("rloo", "p", "a", &[&extra[..], &["--save-every", "2"]].concat()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout_json(&out)["method"], "rloo");
    let metrics = common::read_jsonl(&dir.path().join("a/metrics.jsonl"));
    let last = metrics.iter().rev().find(|m| m.get("loss").is_some()).unwrap();
    for k in ["reward", "rewards/regex:t5/mean", "kl", "entropy", "clip_ratio/region_mean", "completions/mean_length"] {
        assert!(last.get(k).is_some(), "metrics lack {k}: {last}");
    }
    let out = train(dir.path(), rl_args("rloo", "p", "b", &[&extra[..], &["--resume", "a/checkpoint-2"]].concat()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        std::fs::read(dir.path().join("a/adapter_model.safetensors")).unwrap(),
        std::fs::read(dir.path().join("b/adapter_model.safetensors")).unwrap()
    );
    let out = train(dir.path(), rl_args("rloo", "p", "c", &[&extra[..], &["--num-generations", "1"]].concat()));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("at least 2"), "{e}");
}

#[test]
fn ppo_with_a_value_head_resumes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    common::prompt_shards(dir.path());
    let extra =
        ["--reward", "regex:t5", "--ppo-epochs", "2", "--num-mini-batches", "2", "--missing-eos-penalty", "0.5"];
    let out =
        train(dir.path(), rl_args("ppo", "p", "a", &[&extra[..], &["--max-steps", "8", "--save-every", "4"]].concat()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let last = common::read_jsonl(&dir.path().join("a/metrics.jsonl")).pop().unwrap();
    for k in [
        "objective/kl",
        "objective/scores",
        "objective/rlhf_reward",
        "loss/policy_avg",
        "loss/value_avg",
        "policy/clipfrac_avg",
        "val/clipfrac_avg",
        "policy/approxkl_avg",
    ] {
        assert!(last.get(k).is_some(), "metrics lack {k}: {last}");
    }
    assert!(dir.path().join("a/checkpoint-4/extra_vars.safetensors").exists(), "the value head is checkpointed");
    let out = train(
        dir.path(),
        rl_args("ppo", "p", "b", &[&extra[..], &["--max-steps", "8", "--resume", "a/checkpoint-4"]].concat()),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        std::fs::read(dir.path().join("a/adapter_model.safetensors")).unwrap(),
        std::fs::read(dir.path().join("b/adapter_model.safetensors")).unwrap()
    );
}

#[test]
fn a_failing_reward_command_stops_the_run_naming_the_completion_and_keeps_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    common::prompt_shards(dir.path());
    // Scores two rollouts, then crashes on the third.
    let script = dir.path().join("reward.sh");
    std::fs::write(
        &script,
        "n=$(cat count 2>/dev/null || echo 0); echo $((n+1)) > count\n\
         if [ $n -ge 2 ]; then echo 'oops' >&2; exit 3; fi\nwhile read l; do echo 0.5; done\n",
    )
    .unwrap();
    let spec = format!("command:sh {}", script.display());
    let out = train(
        dir.path(),
        rl_args("grpo", "p", "c", &["--reward", &spec, "--max-steps", "4", "--save-every", "1", "--eval-every", "0"]),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("failed") && err.contains("#0") && err.contains("oops"), "{err}");
    assert!(dir.path().join("c/checkpoint-2/state.json").exists(), "the last good checkpoint is intact");
    assert!(!dir.path().join("c/adapter_model.safetensors").exists(), "no final adapter for a failed run");
    for (cmd, want) in [("echo hello", "\"hello\""), ("sleep 30", "did not answer within")] {
        let spec = format!("command:{cmd}");
        let out = train(
            dir.path(),
            rl_args("grpo", "p", "d", &["--reward", &spec, "--max-steps", "1", "--reward-timeout", "1"]),
        );
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want) && err.contains("#0"), "{cmd}: {err}");
    }
}

#[test]
fn misfit_reward_models_and_wrong_shards_are_refused_before_training() {
    let dir = tempfile::tempdir().unwrap();
    common::prompt_shards(dir.path());
    // A reward adapter whose base has another vocabulary.
    let other = dir.path().join("other");
    let mut cfg: tunekit::train::model::config::ModelConfig =
        serde_json::from_slice(&std::fs::read(model().join("config.json")).unwrap()).unwrap();
    cfg.vocab_size = 200;
    tunekit::train::io::hf::write_random_model(&cfg, 1, &other).unwrap();
    let base = tunekit::train::io::load_base(&other, &candle_core::Device::Cpu, None).unwrap();
    let mut m = tunekit::train::model::Model::from_base(&base, &candle_core::Device::Cpu).unwrap();
    let lora = tunekit::train::adapters::lora::LoraSettings::parse_targets("q_proj").unwrap();
    let s = tunekit::train::adapters::lora::LoraSettings {
        r: 2,
        alpha: 4.0,
        dropout: 0.0,
        rslora: false,
        targets: lora,
        doubled_gate_up: false,
        train_router: false,
        use_dora: false,
        init: Default::default(),
    };
    m.add_lora(&s, 0).unwrap();
    m.add_score_head(0).unwrap();
    let rm = dir.path().join("rm");
    tunekit::train::io::peft::save(&m, &s, &other.display().to_string(), &rm).unwrap();
    tunekit::train::io::peft::save_reward_head(&rm, m.score.as_ref().unwrap().as_tensor()).unwrap();
    let spec = format!("model:{}", rm.display());
    let out = train(dir.path(), rl_args("ppo", "p", "e", &["--reward", &spec, "--max-steps", "1"]));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vocabulary of 200") && err.contains("128"), "{err}");
    assert!(!dir.path().join("e/metrics.jsonl").exists(), "refused before the first step");
    // An adapter without a score head is not a reward model.
    let no_head = dir.path().join("nohead");
    tunekit::train::io::peft::save(&m, &s, &other.display().to_string(), &no_head).unwrap();
    let spec = format!("model:{}", no_head.display());
    let err =
        String::from_utf8_lossy(&train(dir.path(), rl_args("grpo", "p", "e", &["--reward", &spec])).stderr).to_string();
    assert!(err.contains("not a reward model"), "{err}");
    // SFT shards are not prompts; no reward is an error too.
    let sft = dir.path().join("sft");
    std::fs::create_dir_all(&sft).unwrap();
    std::fs::write(sft.join("manifest.json"), r#"{"format": "tunekit-shards", "tokenizer": {"vocab_size": 128}}"#)
        .unwrap();
    let err = String::from_utf8_lossy(&train(dir.path(), rl_args("grpo", "sft", "e", &["--reward", "json"])).stderr)
        .to_string();
    assert!(err.contains("--method prompts"), "{err}");
    let err = String::from_utf8_lossy(&train(dir.path(), rl_args("grpo", "p", "e", &[])).stderr).to_string();
    assert!(err.contains("at least one --reward"), "{err}");
}
