//! Every model family against transformers + PEFT: tests/fixtures/families/make_family.py builds a
//! tiny random checkpoint of the family with transformers (its sequences longer than the sliding
//! windows), a PEFT adapter with non-zero B, and the reference numbers; tunekit loads both and must
//! give the same base logits and adapter logits (f32, max |diff| under 1e-4 of the largest logit,
//! about 1e-4 relative), the same packed-row loss (1e-5 relative) and the same LoRA gradients (1e-4
//! of the largest). The script needs torch, transformers and peft (.ci/fetch-tools installs them);
//! without them the tests say SKIPPED, and fail under TUNEKIT_REQUIRE_ASSETS=1 (CI).

mod common;

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;
use tunekit::pack::rows::PackedRow;
use tunekit::train::io::load_base;
use tunekit::train::model::batch::Batch;
use tunekit::train::model::Model;

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

/// The family's checkpoint and reference, made by transformers into `dir`; None where the Python
/// packages are missing (outside CI).
fn reference(family: &str, dir: &Path) -> Option<HashMap<String, Tensor>> {
    let py = common::python_with("torch, transformers, peft")?;
    let script = common::root().join("tests/fixtures/families/make_family.py");
    let out = std::process::Command::new(py).arg(script).arg(family).arg(dir).output().unwrap();
    assert!(out.status.success(), "make_family.py {family}: {}", String::from_utf8_lossy(&out.stderr));
    Some(candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap())
}

fn check(family: &str) {
    let tmp = tempfile::tempdir().unwrap();
    check_in(family, tmp.path());
}

/// [`check`] in `dir`; false where the reference could not be made (outside CI).
fn check_in(family: &str, dir: &Path) -> bool {
    let Some(r) = reference(family, dir) else { return false };
    let v = |k: &str| -> Vec<i32> {
        r[k].to_dtype(DType::I64).unwrap().to_vec1::<i64>().unwrap().into_iter().map(|x| x as i32).collect()
    };
    let row = PackedRow {
        input_ids: v("input_ids"),
        labels: v("labels"),
        position_ids: v("position_ids"),
        seq_lengths: v("seq_lengths"),
    };
    let dev = Device::Cpu;
    let base = load_base(dir, &dev, None).unwrap();
    let mut model = Model::from_base(&base, &dev).unwrap();
    let batch = Batch::from_rows(&[&row], &dev).unwrap();
    let lens: Vec<usize> = row.seq_lengths.iter().map(|&l| l as usize).collect();

    let logits = model.logits(&batch.input_ids, &batch.position_ids, &lens).unwrap();
    let (d, scale) = (max_diff(&logits, &r["base_logits"]), max_abs(&r["base_logits"]));
    assert!(d < 1e-4 * scale.max(1.0), "{family}: base logits differ from transformers by {d} (largest {scale})");

    let settings = tunekit::train::io::peft::load_into(&mut model, &dir.join("adapter")).unwrap();
    let logits = model.logits(&batch.input_ids, &batch.position_ids, &lens).unwrap();
    let (d, scale) = (max_diff(&logits, &r["peft_logits"]), max_abs(&r["peft_logits"]));
    assert!(d < 1e-4 * scale.max(1.0), "{family}: logits with the adapter differ from PEFT by {d} (largest {scale})");

    let mut loss = (model.loss_sum(&batch, None, 4).unwrap() / batch.trained as f64).unwrap();
    if let Some(want) = r.get("aux_loss") {
        // A mixture of experts: transformers' load-balancing loss over the packed example, added with
        // the config's coefficient.
        let records: Vec<_> = model.take_routing().into_iter().map(|(_, r)| r).collect();
        let aux = tunekit::train::model::routing::aux_loss(&records).unwrap().unwrap();
        let (got, want) = (aux.to_scalar::<f32>().unwrap(), want.to_vec1::<f32>().unwrap()[0]);
        assert!((got - want).abs() < 1e-5 * want.abs().max(1.0), "{family}: aux loss {got} vs transformers {want}");
        let coef = r["aux_coef"].to_vec1::<f32>().unwrap()[0] as f64;
        let moe = model.arch.moe.as_ref().unwrap();
        assert!(
            (moe.aux_coef - coef).abs() < 1e-6,
            "{family}: aux coefficient {} vs the config's {coef}",
            moe.aux_coef
        );
        loss = (loss + (aux * coef).unwrap()).unwrap();
    }
    let (got, want) = (loss.to_scalar::<f32>().unwrap(), r["loss"].to_vec1::<f32>().unwrap()[0]);
    assert!((got - want).abs() < 1e-5 * want.abs().max(1.0), "{family}: packed loss {got} vs transformers {want}");

    let grads = loss.backward().unwrap();
    let vars = model.lora_vars();
    let names: Vec<String> = vars.iter().map(|(n, _)| n.clone()).collect();
    let per_var = vars
        .iter()
        .map(|(n, v)| match grads.get(v.as_tensor()) {
            Some(g) => g.clone(),
            // An expert no token was routed to: PEFT's stacked adapters get a zero gradient there.
            None if tunekit::train::model::moe::is_expert_adapter(n) => v.zeros_like().unwrap(),
            None => panic!("{family}: no gradient for {n}"),
        })
        .collect();
    let per_var: Vec<Tensor> = per_var;
    // Gradient checkpointing gives the same gradients, the load-balancing loss included (each
    // sparse layer's part added in its recompute).
    let coef = model.arch.moe.as_ref().map_or(0.0, |m| m.aux_coef);
    let (_, ck) = model.loss_and_grads_checkpointed(&batch, None, 4, 1.0 / batch.trained as f64, coef).unwrap();
    for ((n, g), want) in names.iter().zip(&ck).zip(&per_var) {
        let (d, scale) = (max_diff(g, want), max_abs(want).max(1e-6));
        assert!(d < 1e-4 * scale, "{family}: checkpointed gradient of {n} differs by {d} (largest {scale})");
    }
    // The experts' gradients stacked as PEFT's parameter wrappers hold them.
    let named = tunekit::train::io::peft::to_peft(&names, per_var, &settings.targets).unwrap();
    let expected = r.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(named.len(), expected, "{family}: as many adapter matrices as PEFT's");
    for (n, g) in &named {
        let want = r.get(&format!("grad.{n}")).unwrap_or_else(|| panic!("{family}: PEFT has no {n}"));
        let (d, scale) = (max_diff(g, want), max_abs(want).max(1e-6));
        assert!(d < 1e-4 * scale, "{family}: gradient of {n} differs from torch by {d} (largest {scale})");
    }
    // Merged into a Hugging Face directory, the model transformers loads gives PEFT's logits; and the
    // adapter as tunekit saves it (its target_modules the modules it adapted) loads in PEFT with them.
    let merged = dir.join("merged");
    tunekit::train::io::merge::write_hf(&model, &merged).unwrap();
    let saved = dir.join("saved");
    tunekit::train::io::peft::save(&model, &settings, &dir.display().to_string(), &saved).unwrap();
    let py = common::python_with("torch, transformers").unwrap();
    let script = common::root().join("tests/fixtures/families/hf_logits.py");
    let reference = dir.join("reference.safetensors");
    for (what, args) in
        [("the merged model", vec![merged.clone()]), ("tunekit's adapter", vec![dir.to_path_buf(), saved])]
    {
        let out = dir.join("logits.safetensors");
        let mut cmd = std::process::Command::new(&py);
        cmd.arg(&script).arg(&args[0]).arg(&reference).arg(&out).args(&args[1..]);
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{family}: transformers on {what}: {}", String::from_utf8_lossy(&o.stderr));
        let m = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
        let (d, scale) = (max_diff(&m["logits"], &r["peft_logits"]), max_abs(&r["peft_logits"]));
        assert!(d < 1e-4 * scale.max(1.0), "{family}: {what} in transformers differs from PEFT by {d}");
    }
    eprintln!(
        "{family}: logits, adapter logits, loss {got}, {} gradients, the merged model and the re-saved adapter match",
        named.len()
    );
    true
}

#[test]
fn qwen3_yarn_rope_scaling() {
    check("qwen3_yarn");
}

#[test]
fn gemma3_sliding_windows_local_rope_qk_norms_geglu() {
    check("gemma3");
}

#[test]
fn gemma2_soft_capped_scores_and_logits() {
    check("gemma2");
}

#[test]
fn phi3_fused_projections_partial_longrope() {
    check("phi3");
}

#[test]
fn smollm3_no_rope_every_fourth_layer() {
    check("smollm3");
}

#[test]
fn olmo2_post_norms_whole_qk_norms() {
    check("olmo2");
}

#[test]
fn granite_multipliers() {
    check("granite");
}

#[test]
fn qwen3_moe_experts_with_a_dense_layer_and_expert_lora() {
    check("qwen3_moe");
}

#[test]
fn mixtral_experts_and_sliding_window() {
    check("mixtral");
}

#[test]
fn olmoe_experts_unnormalised_top_k() {
    check("olmoe");
}

#[test]
fn gpt_oss_sinks_clamped_experts_with_biases_router_bias() {
    check("gpt_oss");
}

#[test]
fn gpt_oss_mxfp4_experts_load_as_transformers_dequantises_them_and_stay_4_bit_for_qlora() {
    use tunekit::train::model::layer::Mlp;
    use tunekit::train::model::linear::Weight;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // The dense directory holds transformers' dequantisation of the blocks; it passes the whole check.
    if !check_in("gpt_oss_mxfp4", dir) {
        return;
    }
    let r = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let dev = Device::Cpu;
    let ids: Vec<u32> = r["input_ids"].to_dtype(DType::U32).unwrap().to_vec1().unwrap();
    let pos: Vec<u32> = r["position_ids"].to_dtype(DType::U32).unwrap().to_vec1().unwrap();
    let lens: Vec<usize> =
        r["seq_lengths"].to_dtype(DType::I64).unwrap().to_vec1::<i64>().unwrap().iter().map(|&l| l as usize).collect();
    let (ids, pos) = (Tensor::new(ids, &dev).unwrap(), Tensor::new(pos, &dev).unwrap());
    // The MXFP4 checkpoint, dequantised on load, is the same model.
    let blocks = dir.join("mxfp4");
    let model = Model::from_base(&load_base(&blocks, &dev, None).unwrap(), &dev).unwrap();
    let logits = model.logits(&ids, &pos, &lens).unwrap();
    let (d, scale) = (max_diff(&logits, &r["base_logits"]), max_abs(&r["base_logits"]));
    assert!(d < 1e-4 * scale.max(1.0), "MXFP4 checkpoint: logits differ from transformers by {d}");
    // Loaded for QLoRA, the experts keep their blocks (4.25 bits a weight) and hold the same values.
    let q = Model::from_base(&load_base(&blocks, &dev, Some(tunekit::train::io::Qlora::Nf4)).unwrap(), &dev).unwrap();
    for (a, b) in q.layers.iter().zip(&model.layers) {
        let (Mlp::Sparse(qa), Mlp::Sparse(db)) = (&a.mlp, &b.mlp) else { panic!("gpt-oss layers are sparse") };
        for (qe, de) in qa.experts.iter().zip(&db.experts) {
            for (ql, dl) in [(&qe.gate, &de.gate), (&qe.up, &de.up), (&qe.down, &de.down)] {
                assert!(matches!(ql.weight, Weight::Mxfp4(_)), "{} is not held in MXFP4", ql.name);
                let (params, bytes) = ql.held();
                assert_eq!(bytes * 32, params * 17, "{}: 4.25 bits a weight", ql.name);
                assert_eq!(max_diff(&ql.dense_weight().unwrap(), &dl.dense_weight().unwrap()), 0.0);
            }
        }
    }
}

#[test]
fn granitemoe_stacked_experts_and_multipliers() {
    check("granitemoe");
}

#[test]
fn mistral_sliding_window() {
    check("mistral");
}

#[test]
fn llama_and_qwen3_stay_exact() {
    check("llama");
    check("qwen3");
}

/// A config whose shapes disagree with the weights is refused naming the tensor; an unknown family
/// lists the ones tunekit trains.
#[test]
fn bad_configs_name_the_tensor_or_list_the_families() {
    use tunekit::train::model::config::ModelConfig;
    let tmp = tempfile::tempdir().unwrap();
    let config: ModelConfig = serde_json::from_value(serde_json::json!({
        "model_type": "gemma3_text", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 40,
        "sliding_window": 4, "tie_word_embeddings": true
    }))
    .unwrap();
    tunekit::train::io::hf::write_random_model(&config, 1, tmp.path()).unwrap();
    let base = load_base(tmp.path(), &Device::Cpu, None).unwrap();
    assert!(Model::from_base(&base, &Device::Cpu).is_ok());
    let edit = |key: &str, value: serde_json::Value| {
        let p = tmp.path().join("config.json");
        let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        c[key] = value;
        std::fs::write(&p, c.to_string()).unwrap();
    };
    edit("intermediate_size", 64.into());
    let base = load_base(tmp.path(), &Device::Cpu, None).unwrap();
    let e = Model::from_base(&base, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("model.layers.0.mlp.gate_proj.weight is [48, 32]") && e.contains("[64, 32]"), "{e}");
    edit("model_type", "mamba".into());
    let e = format!("{:#}", load_base(tmp.path(), &Device::Cpu, None).err().unwrap());
    assert!(e.contains("'mamba' is not supported") && e.contains("gemma3_text") && e.contains("olmo2"), "{e}");
}

/// Every family through every objective's path (SFT's chunked loss with gradient checkpointing, DPO's
/// pair, GRPO/PPO's per-token log-probabilities at a temperature with entropies, a reward model's
/// score head): finite losses and a gradient on every adapter matrix, on a small random checkpoint.
#[test]
fn every_family_trains_through_every_objective() {
    use tunekit::train::adapters::lora::LoraSettings;
    use tunekit::train::model::config::ModelConfig;
    use tunekit::train::model::moe::is_expert_adapter;
    use tunekit::train::objectives::dpo::{Dpo, DpoLoss};
    use tunekit::train::objectives::PairObjective;
    let families = [
        ("llama", serde_json::json!({})),
        ("qwen2", serde_json::json!({})),
        ("qwen3", serde_json::json!({})),
        ("gemma3_text", serde_json::json!({"sliding_window": 3})),
        (
            "gemma2",
            serde_json::json!({"sliding_window": 3, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 4.0}),
        ),
        ("phi3", serde_json::json!({"partial_rotary_factor": 0.5})),
        ("smollm3", serde_json::json!({})),
        ("olmo2", serde_json::json!({})),
        (
            "granite",
            serde_json::json!({"embedding_multiplier": 2.0, "residual_multiplier": 0.5, "logits_scaling": 2.0}),
        ),
        (
            "qwen3_moe",
            serde_json::json!({"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                               "mlp_only_layers": [1], "output_router_logits": true}),
        ),
        ("mixtral", serde_json::json!({"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 3})),
        ("olmoe", serde_json::json!({"num_experts": 4, "num_experts_per_tok": 2})),
        (
            "granitemoe",
            serde_json::json!({"num_local_experts": 4, "num_experts_per_tok": 2, "residual_multiplier": 0.5}),
        ),
        ("gpt_oss", serde_json::json!({"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 3})),
    ];
    let row = PackedRow {
        input_ids: (0..12).map(|i| (i * 7 + 3) % 40).collect(),
        labels: (0..12).map(|i| if i < 4 { -100 } else { (i * 7 + 3) % 40 }).collect(),
        position_ids: (0..6).chain(0..6).collect(),
        seq_lengths: vec![6, 6],
    };
    for (family, extra) in families {
        let tmp = tempfile::tempdir().unwrap();
        let mut config = serde_json::json!({
            "model_type": family, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 40,
            "tie_word_embeddings": family != "olmo2"
        });
        config.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let config: ModelConfig = serde_json::from_value(config).unwrap();
        tunekit::train::io::hf::write_random_model(&config, 3, tmp.path()).unwrap();
        let base = load_base(tmp.path(), &Device::Cpu, None).unwrap();
        let mut model = Model::from_base(&base, &Device::Cpu).unwrap();
        let targets = LoraSettings::parse_targets("all-linear").unwrap();
        model
            .add_lora(
                &LoraSettings {
                    r: 2,
                    alpha: 4.0,
                    dropout: 0.0,
                    rslora: false,
                    targets,
                    doubled_gate_up: false,
                    train_router: false,
                    use_dora: false,
                    init: Default::default(),
                },
                1,
            )
            .unwrap();
        for (_, v) in model.lora_vars() {
            // B away from zero, so that every matrix gets a gradient.
            v.set(&(v.as_tensor().ones_like().unwrap() * 0.05).unwrap()).unwrap();
        }
        let batch = Batch::from_rows(&[&row], &Device::Cpu).unwrap();
        let n = model.lora_vars().len();
        let (sft, grads) = model.loss_and_grads_checkpointed(&batch, None, 4, 1.0, 0.01).unwrap();
        assert!(sft.is_finite() && grads.len() == n, "{family}: SFT loss {sft}");
        let names: Vec<String> = model.lora_vars().into_iter().map(|(n, _)| n).collect();
        for (n, g) in names.iter().zip(&grads) {
            // An expert no token was routed to has a zero gradient, as in PEFT.
            assert!(max_abs(g) > 0.0 || is_expert_adapter(n), "{family}: {n} got no SFT gradient");
        }
        let ids: Vec<i32> = row.input_ids[..6].to_vec();
        let labels: Vec<i32> = row.labels[..6].to_vec();
        let pair = tunekit::pack::preference::PreferenceRow {
            chosen_input_ids: ids.clone(),
            chosen_labels: labels.clone(),
            rejected_input_ids: ids.iter().map(|t| (t + 1) % 40).collect(),
            rejected_labels: labels.iter().map(|&t| if t < 0 { t } else { (t + 1) % 40 }).collect(),
        };
        let dpo = Dpo { beta: 0.1, loss: DpoLoss::Sigmoid }.pair(&model, &pair).unwrap().loss;
        let g = dpo.backward().unwrap();
        let reached = |(n, v): &(String, candle_core::Var)| g.get(v.as_tensor()).is_some() || is_expert_adapter(n);
        assert!(model.lora_vars().iter().all(reached), "{family}: DPO gradients");
        let (lp, ent) = model.token_log_probs(&batch, 0.7, true).unwrap();
        let (lp, ent) = (lp.to_vec1::<f32>().unwrap(), ent.unwrap().to_vec1::<f32>().unwrap());
        assert_eq!(lp.len(), batch.trained, "{family}: one log-probability per trained token");
        assert!(lp.iter().all(|x| *x < 0.0) && ent.iter().all(|x| *x > 0.0), "{family}: {lp:?} {ent:?}");
        model.score =
            Some(candle_core::Var::from_tensor(&Tensor::ones((1, 32), DType::F32, &Device::Cpu).unwrap()).unwrap());
        let r = model.reward(&ids).unwrap().to_scalar::<f32>().unwrap();
        assert!(r.is_finite(), "{family}: reward {r}");
    }
}
