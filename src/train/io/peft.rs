//! Adapters in exactly Hugging Face PEFT's format: `adapter_config.json` and
//! `adapter_model.safetensors` with keys like
//! `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (A: r x in, B: out x r).

use crate::train::adapters::lora::{LoraSettings, ALL_LINEAR, PEFT_PREFIX};
use crate::train::adapters::lora_init::LoraInit;
use crate::train::adapters::score::SCORE_WEIGHT;
use crate::train::model::moe::EXPERT_PARAMETERS;
use crate::train::model::Model;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

/// The adapter's `adapter_config.json`; the targets naming expert parameters
/// (`mlp.experts.gate_up_proj`) go to `target_parameters`.
pub fn adapter_config(s: &LoraSettings, base: &str) -> Value {
    let (params, modules): (Vec<&String>, Vec<&String>) = s.targets.iter().partition(|t| is_expert_parameter(t));
    let gate_up = s.doubled_gate_up && params.iter().any(|p| p.ends_with(EXPERT_PARAMETERS[0]));
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": s.r,
        "lora_alpha": s.alpha,
        "lora_dropout": s.dropout,
        "target_modules": modules,
        "target_parameters": if params.is_empty() { Value::Null } else { json!(params) },
        "use_rslora": s.rslora,
        "use_dora": s.use_dora,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": match s.init {
            LoraInit::Default => json!(true),
            other => json!(other.peft_name()),
        },
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": if gate_up { json!({ GATE_UP_PATTERN: 2 * s.r }) } else { json!({}) },
        "alpha_pattern": if gate_up { json!({ GATE_UP_PATTERN: 2.0 * s.alpha }) } else { json!({}) },
        "revision": null,
    })
}

/// PEFT's pattern for the experts' fused gate_up, whose rank and alpha it doubles.
const GATE_UP_PATTERN: &str = ".*\\.gate_up_proj";

/// Whether a target names a mixture's expert parameter (PEFT's `target_parameters`).
fn is_expert_parameter(target: &str) -> bool {
    EXPERT_PARAMETERS.iter().any(|p| target.ends_with(p))
}

/// An expert adapter's name as `Model::lora_vars` gives it, split: (block path, parameter index
/// in [`EXPERT_PARAMETERS`], expert, "A" or "B").
fn expert_part(name: &str) -> Option<(&str, usize, usize, &str)> {
    let stem = name.strip_prefix(PEFT_PREFIX)?.strip_suffix(".weight")?;
    let (stem, ab) = stem.rsplit_once(".lora_")?;
    let (stem, param) = stem.rsplit_once('.')?;
    let k = EXPERT_PARAMETERS.iter().position(|p| p.ends_with(param))?;
    let (block, e) = stem.rsplit_once(".experts.")?;
    Some((block, k, e.parse().ok()?, ab))
}

/// PEFT's key of a stacked expert adapter: the parameters a module has adapted are nested
/// wrappers, the first listed innermost (`experts.base_layer.lora_A` for gate_up_proj when
/// down_proj follows it).
fn stacked_key(block: &str, param: usize, order: &[usize], ab: &str) -> String {
    let k = order.iter().position(|&p| p == param).unwrap_or(0);
    let nesting = ".base_layer".repeat(order.len().saturating_sub(k + 1));
    format!("{PEFT_PREFIX}{block}.experts{nesting}.lora_{ab}.weight")
}

/// The expert parameters adapted, as indices into [`EXPERT_PARAMETERS`], in the order the
/// experts module registers them (gate_up_proj, then down_proj), which is the order PEFT wraps them
/// in whatever order `target_parameters` lists them.
fn expert_order(targets: &[String]) -> Vec<usize> {
    let mut order: Vec<usize> =
        targets.iter().filter_map(|t| EXPERT_PARAMETERS.iter().position(|p| t.ends_with(p))).collect();
    order.sort();
    order.dedup();
    order
}

/// Tensors in `Model::lora_vars` order (the adapters or their gradients) under PEFT's names: the
/// experts' per-expert A [r, in] and B [out, r] stacked as PEFT's 3-D parameter wrapper keeps
/// them, A [E r, in] (expert-major) and B [out, r E] (expert-minor).
pub fn to_peft(names: &[String], tensors: Vec<Tensor>, targets: &[String]) -> Result<HashMap<String, Tensor>> {
    let order = expert_order(targets);
    let mut out = HashMap::new();
    let mut groups: Vec<(String, Vec<Tensor>)> = vec![];
    for (name, t) in names.iter().zip(tensors) {
        match expert_part(name) {
            None => {
                out.insert(name.clone(), t);
            }
            Some((block, k, _, ab)) => {
                let key = stacked_key(block, k, &order, ab);
                match groups.iter_mut().find(|g| g.0 == key) {
                    Some(g) => g.1.push(t),
                    None => groups.push((key, vec![t])),
                }
            }
        }
    }
    for (key, per_expert) in groups {
        let stacked = match key.ends_with(".lora_A.weight") {
            true => Tensor::cat(&per_expert, 0)?,
            false => {
                let (e, (o, r)) = (per_expert.len(), per_expert[0].dims2()?);
                Tensor::stack(&per_expert, 2)?.reshape((o, r * e))?
            }
        };
        out.insert(key, stacked);
    }
    Ok(out)
}

/// One expert's A or B out of PEFT's stacked tensor (the inverse of [`to_peft`]).
fn expert_slice(stacked: &Tensor, ab: &str, e: usize, experts: usize) -> Result<Tensor> {
    Ok(match ab {
        "A" => {
            let r = stacked.dim(0)? / experts;
            stacked.narrow(0, e * r, r)?
        }
        _ => {
            let (o, re) = stacked.dims2()?;
            stacked.reshape((o, re / experts, experts))?.narrow(2, e, 1)?.squeeze(2)?
        }
    })
}

/// One expert parameter's adapters, read per expert from PEFT's stacked tensors.
pub struct ExpertAdapter {
    /// Index in [`EXPERT_PARAMETERS`]: 0 the fused gate_up, 1 down.
    pub param: usize,
    /// Each expert's (A [r, in], B [out, r]) as the model holds them.
    pub per_expert: Vec<(Tensor, Tensor)>,
    /// alpha / r (gate_up's rank and alpha doubled where the settings say).
    pub scale: f64,
}

/// The adapted expert parameters of the sparse block at `block` (`model.layers.3.mlp`).
pub fn expert_adapters(
    s: &LoraSettings,
    tensors: &HashMap<String, Tensor>,
    block: &str,
    experts: usize,
) -> Result<Vec<ExpertAdapter>> {
    let order = expert_order(&s.targets);
    let mut out = vec![];
    for &k in &order {
        let key = |ab: &str| stacked_key(block, k, &order, ab);
        let (Some(a), Some(b)) = (tensors.get(&key("A")), tensors.get(&key("B"))) else { continue };
        let per_expert = (0..experts)
            .map(|e| Ok((expert_slice(a, "A", e, experts)?, expert_slice(b, "B", e, experts)?)))
            .collect::<Result<Vec<_>>>()?;
        let scale = match k == 0 && s.doubled_gate_up {
            true => LoraSettings { r: 2 * s.r, alpha: 2.0 * s.alpha, ..s.clone() }.scale(),
            false => s.scale(),
        };
        out.push(ExpertAdapter { param: k, per_expert, scale });
    }
    Ok(out)
}

/// Writes the model's adapters as a PEFT adapter directory. PiSSA/OLoRA adapters, whose base holds
/// a residual, are written converted to plain LoRA on the original base, as PEFT's
/// `save_pretrained(path_initial_model_for_weight_conversion=...)`: `s B A - s B0 A0` as rank 2r,
/// A' = [A; A0], B' = [B, -B0], alpha doubled (times sqrt 2 with rsLoRA) so that the scale stays.
pub fn save(model: &Model, s: &LoraSettings, base: &str, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // The modules the model adapted, by their own names (Phi-3's qkv_proj for q_proj and the
    // rest), then the expert parameters.
    let (mut targets, params) = model.adapted_modules();
    targets.extend(params);
    let vars = model.lora_vars();
    let initials = model.lora_initials();
    let names: Vec<String> = vars.iter().map(|(n, _)| n.clone()).collect();
    let trained = vars
        .iter()
        .map(|(n, v)| match initials.get(n) {
            Some(t0) if n.ends_with(".lora_A.weight") => Ok(Tensor::cat(&[v.as_tensor(), t0], 0)?),
            Some(t0) => Ok(Tensor::cat(&[v.as_tensor(), &t0.neg()?], 1)?),
            None => Ok(v.as_tensor().clone()),
        })
        .collect::<Result<Vec<_>>>()?;
    let tensors = to_peft(&names, trained, &targets)?;
    let tmp = dir.join(".adapter_model.safetensors.partial");
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, dir.join("adapter_model.safetensors"))?;
    let adapted = match initials.is_empty() {
        true => LoraSettings { targets, ..s.clone() },
        false => LoraSettings {
            targets,
            r: 2 * s.r,
            alpha: s.alpha * if s.rslora { 2f64.sqrt() } else { 2.0 },
            init: LoraInit::Default,
            ..s.clone()
        },
    };
    let mut cfg = adapter_config(&adapted, base);
    if let (true, Some(layout)) = (s.train_router, model.family.moe) {
        cfg["modules_to_save"] = json!([layout.router]);
    }
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_string_pretty(&cfg)?)?;
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
    let mut saved: Vec<Value> = cfg["modules_to_save"].as_array().cloned().unwrap_or_default();
    saved.push(json!("score"));
    cfg["modules_to_save"] = Value::Array(saved);
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
    let mut targets: Vec<String> = match &cfg["target_modules"] {
        Value::Array(a) => a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
        Value::String(s) if s == "all-linear" => ALL_LINEAR.iter().map(|s| s.to_string()).collect(),
        Value::Null if cfg["target_parameters"].is_array() => vec![],
        other => bail!("{}: target_modules {other} is not supported", dir.display()),
    };
    // Only the parameters PEFT names adapt experts; module names that would select them here do
    // not when the adapter came from PEFT.
    // PEFT saves them as given and by their last name too (`gate_up_proj`).
    if let Value::Array(a) = &cfg["target_parameters"] {
        for p in a.iter().filter_map(|v| v.as_str()) {
            let last = p.rsplit('.').next().unwrap_or(p);
            let Some(param) = EXPERT_PARAMETERS.iter().find(|x| x.ends_with(&format!(".{last}"))) else {
                bail!(
                    "{}: target_parameters '{p}' is not an expert parameter tunekit adapts ({})",
                    dir.display(),
                    EXPERT_PARAMETERS.join(", ")
                );
            };
            if !targets.iter().any(|t| t == param) {
                targets.push(param.to_string());
            }
        }
    }
    let r = cfg["r"].as_u64().context("adapter_config.json has no r")? as usize;
    // Converting gate_proj/up_proj targets of an MoE into the experts' fused gate_up, PEFT gives it
    // twice the rank and alpha; no other pattern is read.
    let mut doubled_gate_up = false;
    for pattern in ["rank_pattern", "alpha_pattern"] {
        if let Some(map) = cfg[pattern].as_object() {
            for (k, v) in map {
                let base = if pattern == "rank_pattern" { r as f64 } else { cfg["lora_alpha"].as_f64().unwrap_or(0.0) };
                if !(k.ends_with("gate_up_proj") && v.as_f64() == Some(2.0 * base)) {
                    bail!(
                        "{}: {pattern} {{{k}: {v}}} is not supported (only PEFT's doubled gate_up_proj)",
                        dir.display()
                    );
                }
                doubled_gate_up = true;
            }
        }
    }
    // Modules PEFT trains in full: a reward model's head (PEFT lists `classifier` and `score` for
    // sequence classifiers; the file holds the one the model has), a mixture's routers.
    let saved: Vec<&str> =
        cfg["modules_to_save"].as_array().map(|a| a.iter().filter_map(|v| v.as_str()).collect()).unwrap_or_default();
    if let Some(m) = saved.iter().find(|m| !matches!(**m, "score" | "classifier" | "gate" | "router")) {
        bail!(
            "{}: modules_to_save '{m}' is not supported (a reward model's score, a mixture's router: gate or router)",
            dir.display()
        );
    }
    let s = LoraSettings {
        r,
        doubled_gate_up,
        train_router: saved.iter().any(|m| matches!(*m, "gate" | "router")),
        use_dora: cfg["use_dora"].as_bool().unwrap_or(false),
        init: init_of(&cfg["init_lora_weights"]).with_context(|| dir.display().to_string())?,
        alpha: cfg["lora_alpha"].as_f64().context("adapter_config.json has no lora_alpha")?,
        dropout: cfg["lora_dropout"].as_f64().unwrap_or(0.0),
        rslora: cfg["use_rslora"].as_bool().unwrap_or(false),
        targets,
    };
    let tensors = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &candle_core::Device::Cpu)?;
    Ok((s, tensors))
}

/// How an adapter's A and B started, from its `init_lora_weights`: PiSSA/OLoRA adapters saved
/// unconverted need the base turned into the same residual (PEFT redoes the decomposition when it
/// loads them, and so does [`load_into`]); those whose residual cannot be redone are refused.
fn init_of(v: &Value) -> Result<LoraInit> {
    let Some(name) = v.as_str() else { return Ok(LoraInit::Default) };
    if name.starts_with("pissa") || name == "olora" {
        return LoraInit::parse(name);
    }
    if matches!(name, "loftq" | "corda" | "lora_ga") {
        bail!(
            "init_lora_weights '{name}' changed the base weights in a way tunekit does not redo; save the adapter \
             with PEFT's path_initial_model_for_weight_conversion (plain LoRA on the original base)"
        );
    }
    Ok(LoraInit::Default)
}

/// The trained part of a tensor [`save`] converted (A's first r rows, B's first r columns), after
/// checking that its initial part is the model's own PiSSA/OLoRA start (`initial`, A0 or B0): a
/// checkpoint resumes on the base it was started from.
pub fn trained_part(name: &str, t: &Tensor, initial: &Tensor) -> Result<Tensor> {
    let is_a = name.ends_with(".lora_A.weight");
    let dim = if is_a { 0 } else { 1 };
    let r = initial.dim(dim)?;
    if t.dim(dim)? != 2 * r {
        bail!("{name}: {:?} is not a converted PiSSA/OLoRA adapter of rank {r}", t.dims());
    }
    let start = t.narrow(dim, r, r)?;
    let start = if is_a { start } else { start.neg()? };
    let d = (start.to_device(initial.device())? - initial)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let scale = initial.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(1e-12);
    if d > 1e-4 * scale {
        bail!(
            "{name}: the checkpoint's initial factors differ from this base's by {d:.3e}: resume on the base \
             the run started from"
        );
    }
    Ok(t.narrow(dim, 0, r)?)
}

/// Attaches an adapter read from disk to the model (creating the LoRA layers it names).
pub fn load_into(model: &mut Model, dir: &Path) -> Result<LoraSettings> {
    let (s, tensors) = read(dir)?;
    model.add_lora(&s, 0)?;
    if let Some(h) = tensors.get(SCORE_WEIGHT) {
        model.score =
            Some(candle_core::Var::from_tensor(&h.to_device(&model.device)?.to_dtype(candle_core::DType::F32)?)?);
    }
    let order = expert_order(&s.targets);
    let experts = model.arch.moe.as_ref().map(|m| m.experts).unwrap_or(1);
    for (name, var) in model.lora_vars() {
        let t = match expert_part(&name) {
            None => tensors.get(&name).cloned(),
            Some((block, k, e, ab)) => match tensors.get(&stacked_key(block, k, &order, ab)) {
                Some(t) => Some(expert_slice(t, ab, e, experts)?),
                None => None,
            },
        };
        let t = t.with_context(|| format!("{}: adapter has no tensor for {name}", dir.display()))?;
        if t.dims() != var.dims() {
            bail!("{}: {name} is {:?} in the adapter but {:?} in this model", dir.display(), t.dims(), var.dims());
        }
        var.set(&t.to_device(&model.device)?.to_dtype(candle_core::DType::F32)?.contiguous()?)?;
    }
    Ok(s)
}
