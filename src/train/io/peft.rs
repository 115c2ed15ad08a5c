//! Adapters in exactly Hugging Face PEFT's format: `adapter_config.json` and
//! `adapter_model.safetensors` with keys like
//! `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (A: r x in, B: out x r).

use crate::train::adapters::lora::{LoraSettings, ALL_LINEAR};
use crate::train::adapters::score::SCORE_WEIGHT;
use crate::train::model::Model;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

pub fn adapter_config(s: &LoraSettings, base: &str) -> Value {
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": s.r,
        "lora_alpha": s.alpha,
        "lora_dropout": s.dropout,
        "target_modules": s.targets,
        "use_rslora": s.rslora,
        "use_dora": false,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    })
}

pub fn save(model: &Model, s: &LoraSettings, base: &str, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tensors: HashMap<String, Tensor> =
        model.lora_vars().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
    let tmp = dir.join(".adapter_model.safetensors.partial");
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, dir.join("adapter_model.safetensors"))?;
    // The modules the model adapted, by their own names (Phi-3's qkv_proj for q_proj and the rest).
    let adapted = LoraSettings { targets: model.adapted_modules(), ..s.clone() };
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_string_pretty(&adapter_config(&adapted, base))?)?;
    Ok(())
}

/// A reward model's head, as PEFT saves `modules_to_save = ["score"]` for a sequence classifier:
/// `base_model.model.score.weight` [1, hidden] in the adapter file, task_type SEQ_CLS.
pub fn save_reward_head(dir: &Path, head: &Tensor) -> Result<()> {
    let file = dir.join("adapter_model.safetensors");
    let mut t = candle_core::safetensors::load(&file, &candle_core::Device::Cpu)?;
    t.insert(SCORE_WEIGHT.into(), head.clone());
    candle_core::safetensors::save(&t, &file)?;
    let p = dir.join("adapter_config.json");
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&p)?)?;
    cfg["task_type"] = json!("SEQ_CLS");
    cfg["modules_to_save"] = json!(["score"]);
    std::fs::write(&p, serde_json::to_string_pretty(&cfg)?)?;
    Ok(())
}

/// Reads a PEFT LoRA adapter directory: its settings and tensors.
pub fn read(dir: &Path) -> Result<(LoraSettings, HashMap<String, Tensor>)> {
    let cfg: Value = serde_json::from_slice(
        &std::fs::read(dir.join("adapter_config.json"))
            .with_context(|| format!("{}: no adapter_config.json", dir.display()))?,
    )?;
    if cfg["peft_type"] != "LORA" {
        bail!("{}: peft_type {} is not LORA", dir.display(), cfg["peft_type"]);
    }
    let targets: Vec<String> = match &cfg["target_modules"] {
        Value::Array(a) => a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
        Value::String(s) if s == "all-linear" => ALL_LINEAR.iter().map(|s| s.to_string()).collect(),
        other => bail!("{}: target_modules {other} is not supported", dir.display()),
    };
    let s = LoraSettings {
        r: cfg["r"].as_u64().context("adapter_config.json has no r")? as usize,
        alpha: cfg["lora_alpha"].as_f64().context("adapter_config.json has no lora_alpha")?,
        dropout: cfg["lora_dropout"].as_f64().unwrap_or(0.0),
        rslora: cfg["use_rslora"].as_bool().unwrap_or(false),
        targets,
    };
    let tensors = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &candle_core::Device::Cpu)?;
    Ok((s, tensors))
}

/// Attaches an adapter read from disk to the model (creating the LoRA layers it names).
pub fn load_into(model: &mut Model, dir: &Path) -> Result<LoraSettings> {
    let (s, tensors) = read(dir)?;
    model.add_lora(&s, 0)?;
    if let Some(h) = tensors.get(SCORE_WEIGHT) {
        model.score =
            Some(candle_core::Var::from_tensor(&h.to_device(&model.device)?.to_dtype(candle_core::DType::F32)?)?);
    }
    for (name, var) in model.lora_vars() {
        let t = tensors.get(&name).with_context(|| format!("{}: adapter has no tensor {name}", dir.display()))?;
        var.set(&t.to_device(&model.device)?.to_dtype(candle_core::DType::F32)?)?;
    }
    Ok(s)
}
