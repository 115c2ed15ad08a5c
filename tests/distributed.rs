//! Data-parallel training over MPI (`cargo test --release --features mpi --test distributed`;
//! Open MPI's mpirun must be installed): two ranks train exactly what one rank does with twice the
//! micro-batches per step; ranks that disagree, fail or die stop the job with a clear error and
//! leave nothing that looks complete.
#![cfg(feature = "mpi")]

mod common;

use candle_core::Device;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn binary() -> String {
    env!("CARGO_BIN_EXE_tunekit").to_string()
}

/// `tunekit train` on the tiny Llama with `extra` flags, as argument strings.
fn train_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec![binary(), "-q".into(), "train".into()];
    for s in [
        "--model",
        &common::tiny_llama().display().to_string(),
        "--data",
        &data.display().to_string(),
        "--out",
        &out.display().to_string(),
        "--batch-tokens",
        "128",
        "--lr",
        "1e-2",
        "--lora-r",
        "4",
        "--lora-alpha",
        "8",
        "--eval-every",
        "0",
    ] {
        a.push(s.to_string());
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// mpirun over one or more application contexts (`ranks` processes each), joined by ':'.
fn mpirun(apps: &[(usize, Vec<String>)]) -> Output {
    let mut c = Command::new("mpirun");
    c.args(["--allow-run-as-root", "--oversubscribe", "--bind-to", "none"]);
    for (i, (n, args)) in apps.iter().enumerate() {
        if i > 0 {
            c.arg(":");
        }
        c.args(["-np", &n.to_string()]).args(args);
    }
    c.env("OMP_NUM_THREADS", "1").env("RAYON_NUM_THREADS", "1");
    c.output().expect("mpirun runs (apt install openmpi-bin)")
}

fn run_single(args: &[String]) -> Output {
    Command::new(&args[0]).args(&args[1..]).env("RAYON_NUM_THREADS", "1").output().unwrap()
}

fn losses(dir: &Path) -> Vec<f64> {
    common::read_jsonl(&dir.join("metrics.jsonl")).iter().filter_map(|r| r["loss"].as_f64()).collect()
}

fn max_adapter_difference(a: &Path, b: &Path) -> f32 {
    let ta = candle_core::safetensors::load(a.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let tb = candle_core::safetensors::load(b.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(ta.len(), tb.len());
    ta.iter()
        .map(|(k, x)| {
            let y = &tb[k];
            (x - y).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
        })
        .fold(0.0, f32::max)
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn two_ranks_train_what_one_rank_does_with_twice_the_micro_batches() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("shards");
    common::counting_shards(&data, 128, 40);
    let steps = ["--max-steps", "6", "--lora-dropout", "0"];
    ok(&run_single(&train_args(&data, &dir.path().join("one"), &[&steps[..], &["--grad-accum", "2"]].concat())));
    ok(&mpirun(&[(2, train_args(&data, &dir.path().join("two"), &[&steps[..], &["--grad-accum", "1"]].concat()))]));
    let (a, b) = (losses(&dir.path().join("one")), losses(&dir.path().join("two")));
    assert_eq!(a.len(), 6);
    assert_eq!(a.len(), b.len(), "one metrics line per step, from rank 0 only");
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-5, "losses {a:?} vs {b:?}");
    }
    let d = max_adapter_difference(&dir.path().join("one"), &dir.path().join("two"));
    assert!(d < 1e-5, "adapters differ by {d}");
    assert!(a[5] < a[0], "the loss falls: {a:?}");
}

#[test]
fn two_ranks_train_dpo_and_reward_models_as_one_rank_with_twice_the_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pairs");
    common::counting_pairs(&data, 9);
    // 24 pairs, 6 per step: four steps an epoch, so the run reshuffles once.
    for method in ["dpo", "reward"] {
        let flags = ["--method", method, "--max-steps", "6", "--lr", "2e-2"];
        let (one, two) = (dir.path().join(format!("{method}-one")), dir.path().join(format!("{method}-two")));
        ok(&run_single(&train_args(&data, &one, &[&flags[..], &["--grad-accum", "6"]].concat())));
        ok(&mpirun(&[(2, train_args(&data, &two, &[&flags[..], &["--grad-accum", "3"]].concat()))]));
        let (a, b) = (common::read_jsonl(&one.join("metrics.jsonl")), common::read_jsonl(&two.join("metrics.jsonl")));
        assert_eq!(a.len(), 6, "{method}");
        assert_eq!(a.len(), b.len(), "{method}: one metrics line per step, from rank 0 only");
        for (x, y) in a.iter().zip(&b) {
            for k in ["loss", "rewards/chosen", "rewards/margins", "rewards/accuracies", "tokens"] {
                let (x, y) = (x[k].as_f64().unwrap(), y[k].as_f64().unwrap());
                assert!((x - y).abs() < 1e-5, "{method} {k}: {x} vs {y}");
            }
        }
        let d = max_adapter_difference(&one, &two);
        assert!(d < 1e-5, "{method}: adapters differ by {d}");
        assert!(a[5]["loss"].as_f64() < a[0]["loss"].as_f64(), "{method}: the loss falls");
    }
    // The reward model's score head is summed over the ranks and saved (and compared above) with the adapters.
    let two = candle_core::safetensors::load(dir.path().join("reward-two/adapter_model.safetensors"), &Device::Cpu);
    assert!(two.unwrap().keys().any(|k| k.contains("score")));
}

#[test]
fn two_ranks_run_grpo_and_ppo_as_one_rank_with_twice_the_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::prompt_shards(dir.path());
    let rl = |method: &str| -> Vec<String> {
        // 4 prompts x 3 completions a rollout (two micro-batches of --batch-tokens 128): one per rank.
        let common = ["--method", method, "--num-generations", "3", "--max-completion-tokens", "6", "--seed", "3"];
        let own: &[&str] = match method {
            "grpo" => &["--reward", "regex:t5", "--reward", "length:3*0.5", "--beta", "0.04", "--num-iterations", "2"],
            // One mini-batch of the 12 completions: two micro-batches of --batch-tokens 128, one per rank.
            _ => &[
                "--reward",
                "regex:t5",
                "--ppo-epochs",
                "2",
                "--num-mini-batches",
                "1",
                "--missing-eos-penalty",
                "0.5",
            ],
        };
        [&common[..], own, &["--max-steps", "8"]].concat().iter().map(|s| s.to_string()).collect()
    };
    for method in ["grpo", "ppo"] {
        let flags = rl(method);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let (one, two) = (dir.path().join(format!("{method}-one")), dir.path().join(format!("{method}-two")));
        ok(&run_single(&train_args(&data, &one, &[&flags[..], &["--prompts-per-step", "4"]].concat())));
        let two_ranks = [&flags[..], &["--prompts-per-step", "2", "--save-every", "3"]].concat();
        ok(&mpirun(&[(2, train_args(&data, &two, &two_ranks))]));
        // Resumed mid-rollout, each rank restores the whole rollout rank 0 saved.
        let resumed = dir.path().join(format!("{method}-resumed"));
        let ckpt = two.join("checkpoint-3").display().to_string();
        ok(&mpirun(&[(2, train_args(&data, &resumed, &[&two_ranks[..], &["--resume", &ckpt]].concat()))]));
        assert_eq!(
            std::fs::read(two.join("adapter_model.safetensors")).unwrap(),
            std::fs::read(resumed.join("adapter_model.safetensors")).unwrap(),
            "{method}: the resumed two-rank run ends with the same adapter bytes"
        );
        // Each rank sampled and scored half of every rollout: the completions are the one process's.
        let (ra, rb) =
            (common::read_jsonl(&one.join("rollouts.jsonl")), common::read_jsonl(&two.join("rollouts.jsonl")));
        assert!(!ra.is_empty());
        assert_eq!(ra.len(), rb.len(), "{method}: rank 0 logs every rank's completions");
        for (x, y) in ra.iter().zip(&rb) {
            assert_eq!(
                (&x["prompt_id"], &x["completion"], &x["reward"]),
                (&y["prompt_id"], &y["completion"], &y["reward"])
            );
            assert!((x["advantage"].as_f64().unwrap() - y["advantage"].as_f64().unwrap()).abs() < 1e-5);
        }
        let (a, b) = (common::read_jsonl(&one.join("metrics.jsonl")), common::read_jsonl(&two.join("metrics.jsonl")));
        assert_eq!(a.len(), 8, "{method}");
        assert_eq!(a.len(), b.len(), "{method}");
        let keys: &[&str] = match method {
            "grpo" => &["loss", "reward", "kl", "entropy", "clip_ratio/region_mean", "tokens"],
            _ => &["loss", "objective/kl", "loss/value_avg", "policy/entropy_avg", "tokens"],
        };
        for (x, y) in a.iter().zip(&b) {
            for k in keys {
                let (x, y) = (x[k].as_f64().unwrap(), y[k].as_f64().unwrap());
                assert!((x - y).abs() < 1e-5 * x.abs().max(1.0), "{method} {k}: {x} vs {y}");
            }
        }
        let d = max_adapter_difference(&one, &two);
        assert!(d < 1e-5, "{method}: adapters differ by {d}");
    }
}

#[test]
fn a_two_rank_run_resumes_bit_for_bit_and_only_with_two_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("shards");
    common::counting_shards(&data, 128, 40);
    // Dropout on: each rank draws its own stream, and resuming restores every rank's.
    let flags = ["--max-steps", "6", "--save-every", "3"];
    ok(&mpirun(&[(2, train_args(&data, &dir.path().join("a"), &flags))]));
    let ckpt = dir.path().join("a/checkpoint-3").display().to_string();
    let mut resumed = train_args(&data, &dir.path().join("b"), &flags);
    resumed.extend(["--resume".to_string(), ckpt.clone()]);
    ok(&mpirun(&[(2, resumed.clone())]));
    let a = std::fs::read(dir.path().join("a/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(dir.path().join("b/adapter_model.safetensors")).unwrap();
    assert_eq!(a, b, "the resumed two-rank run ends with the same adapter bytes");
    let one = run_single(&resumed);
    assert!(!one.status.success());
    let err = String::from_utf8_lossy(&one.stderr);
    assert!(err.contains("saved by a run of 2 rank(s); this run has 1"), "{err}");
}

#[test]
fn ranks_with_different_options_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("shards");
    common::counting_shards(&data, 128, 20);
    let out = dir.path().join("run");
    let o = mpirun(&[
        (1, train_args(&data, &out, &["--max-steps", "3"])),
        (1, train_args(&data, &out, &["--max-steps", "3", "--lr", "2e-2"])),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("rank(s) 1 of 2 run with other options or data than rank 0"), "{err}");
    assert!(!out.join("adapter_model.safetensors").exists());
}

#[test]
fn a_rank_that_fails_or_dies_stops_the_job_without_a_finished_looking_output() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("shards");
    common::counting_shards(&data, 128, 20);
    // Rank 1 cannot read its data: it says so and the job stops at once (rank 0 would otherwise
    // wait for it in the first collective).
    let out = dir.path().join("fails");
    let t = Instant::now();
    let o = mpirun(&[
        (1, train_args(&data, &out, &["--max-steps", "3"])),
        (1, train_args(&dir.path().join("missing"), &out, &["--max-steps", "3"])),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("error: rank 1 of 2:") && err.contains("missing"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(60), "stopped in {:?}", t.elapsed());
    assert!(!out.join("adapter_model.safetensors").exists());
    // Rank 1 is killed mid-run: mpirun stops rank 0; no adapter, no checkpoint that looks finished.
    let out = dir.path().join("dies");
    let mut killed = vec!["timeout".to_string(), "-s".into(), "KILL".into(), "4".into()];
    killed.extend(train_args(&data, &out, &["--max-steps", "100000"]));
    let t = Instant::now();
    let o = mpirun(&[(1, train_args(&data, &out, &["--max-steps", "100000"])), (1, killed)]);
    assert!(!o.status.success());
    assert!(t.elapsed() < Duration::from_secs(90), "stopped in {:?}", t.elapsed());
    assert!(!out.join("adapter_model.safetensors").exists());
    assert!(!out.join("checkpoint-last").exists());
}

#[test]
#[cfg(not(feature = "nccl"))]
fn torchrun_ranks_in_a_build_without_nccl_are_told_which_build_they_need() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("shards");
    common::counting_shards(&data, 128, 8);
    let args = train_args(&data, &dir.path().join("out"), &["--max-steps", "1"]);
    let torchrun = [
        ("WORLD_SIZE", "2"),
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29500"),
    ];
    let o = Command::new(&args[0]).args(&args[1..]).envs(torchrun).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("torchrun started 2 ranks") && err.contains("--features nccl"), "{err}");
    // Asking for NCCL by name in this build says the same; an unknown backend is named.
    let o = Command::new(&args[0]).args(&args[1..]).envs(torchrun).env("TUNEKIT_BACKEND", "nccl").output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("rebuild with `--features nccl`"));
    let o = Command::new(&args[0]).args(&args[1..]).env("TUNEKIT_BACKEND", "gloo").output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("TUNEKIT_BACKEND=gloo"));
    assert!(!dir.path().join("out").join("adapter_model.safetensors").exists());
}
