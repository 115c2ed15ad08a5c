//! Hugging Face model directories: config.json with model.safetensors or shards listed in
//! model.safetensors.index.json, read tensor by tensor (QLoRA quantises each projection as it is
//! read); and a small random model written in the same form, a stand-in base for demos and tests.

use crate::train::model::base::{is_projection, nf4_of, BaseModel};
use crate::train::model::config::ModelConfig;
use crate::train::model::family::{ExpertStorage, QkNorm};
use crate::train::model::moe::Biases;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The safetensors files of a Hugging Face model directory: model.safetensors, or the shards its
/// index lists.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(if dir.join("model.safetensors.index.json").exists() {
        let idx: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("model.safetensors.index.json"))?)?;
        let mut f: Vec<String> = idx["weight_map"]
            .as_object()
            .context("model.safetensors.index.json has no weight_map")?
            .values()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        f.sort();
        f.dedup();
        f.into_iter().map(|n| dir.join(n)).collect()
    } else if dir.join("model.safetensors").exists() {
        vec![dir.join("model.safetensors")]
    } else {
        bail!("{}: no model.safetensors or model.safetensors.index.json", dir.display());
    })
}

/// The tensors named `names` that a Hugging Face model directory holds (f32, on the CPU; absent
/// ones left out), without loading the rest.
pub fn read_tensors(dir: &Path, names: &[&str]) -> Result<HashMap<String, Tensor>> {
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&safetensors_files(dir)?) }
        .with_context(|| format!("cannot read the safetensors of {}", dir.display()))?;
    let held: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    let mut out = HashMap::new();
    for name in names.iter().filter(|n| held.iter().any(|h| h == *n)) {
        out.insert(name.to_string(), st.load(name, &Device::Cpu)?.to_dtype(DType::F32)?);
    }
    Ok(out)
}

pub fn load_hf_dir(dir: &Path, device: &Device, nf4: bool) -> Result<BaseModel> {
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    crate::train::model::family::describe(&config).with_context(|| dir.join("config.json").display().to_string())?;
    let files = safetensors_files(dir)?;
    let mut tensors = HashMap::new();
    let mut nf4_map = HashMap::new();
    // Memory-mapped: each tensor is materialised (and quantised, for QLoRA) on its own.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
        .with_context(|| format!("cannot read the safetensors of {}", dir.display()))?;
    let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    for name in names {
        let t = st.load(&name, device)?;
        if nf4 && is_projection(&name) {
            nf4_map.insert(name.trim_end_matches(".weight").to_string(), nf4_of(&t)?);
        } else if t.dtype() == DType::U8 {
            tensors.insert(name, t); // MXFP4 blocks and scales stay bytes
        } else {
            tensors.insert(name, t.to_dtype(DType::F32)?);
        }
    }
    Ok(BaseModel {
        config,
        tensors,
        nf4: nf4_map,
        quantized: HashMap::new(),
        qlora: nf4,
        source: dir.to_path_buf(),
        gguf_metadata: None,
    })
}

/// A small randomly initialised model (normal, std 0.02; norms at 1) with the given config, written
/// as a Hugging Face directory: a stand-in base for demos and tests when no checkpoint is at hand.
pub fn write_random_model(config: &ModelConfig, seed: u64, out: &Path) -> Result<()> {
    let device = Device::Cpu;
    let mut rng = crate::split::SplitMix64::new(seed);
    let mut normal = |shape: (usize, usize)| -> Result<Tensor> {
        let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| (rng.normal() * 0.02) as f32).collect();
        Ok(Tensor::from_vec(v, shape, &device)?)
    };
    let (h, i, v) = (config.hidden_size, config.intermediate_size, config.vocab_size);
    let (q, kv) = (config.num_attention_heads * config.head_dim(), config.kv_heads() * config.head_dim());
    let family = crate::train::model::family::of_model_type(&config.model_type)?;
    let arch = crate::train::model::family::describe(config)?;
    let ones = |n: usize| Tensor::ones(n, DType::F32, &device);
    // Norm weights that apply as 1 whatever the family's offset (Gemma stores w for 1 + w).
    let unit = |n: usize| -> Result<Tensor> { Ok((ones(n)? * (1.0 - family.norm_offset))?) };
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert("model.embed_tokens.weight".into(), normal((v, h))?);
    t.insert("model.norm.weight".into(), unit(h)?);
    // In PEFT's order (the random draws follow it).
    let projections: Vec<(&str, (usize, usize))> = match family.fused {
        true => vec![
            ("self_attn.qkv_proj", (q + 2 * kv, h)),
            ("self_attn.o_proj", (h, q)),
            ("mlp.gate_up_proj", (2 * i, h)),
            ("mlp.down_proj", (h, i)),
        ],
        false => vec![
            ("self_attn.q_proj", (q, h)),
            ("self_attn.k_proj", (kv, h)),
            ("self_attn.v_proj", (kv, h)),
            ("self_attn.o_proj", (h, q)),
            ("mlp.gate_proj", (i, h)),
            ("mlp.up_proj", (i, h)),
            ("mlp.down_proj", (h, i)),
        ],
    };
    let qk_norm = match arch.qk_norm {
        QkNorm::None => None,
        QkNorm::PerHead => Some((config.head_dim(), config.head_dim())),
        QkNorm::Whole => Some((q, kv)),
    };
    for l in 0..config.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let sparse = arch.layers[l].sparse;
        for &(n, shape) in &projections {
            if !(sparse && n.starts_with("mlp.")) {
                t.insert(format!("{p}.{n}.weight"), normal(shape)?);
            }
        }
        if let (true, Some(moe), Some(layout)) = (sparse, &arch.moe, family.moe) {
            // The router, then each expert's gate, up, down, in the family's stored layout.
            let router = normal((moe.experts, h))?;
            let mi = moe.intermediate;
            let experts = (0..moe.experts)
                .map(|_| Ok((normal((mi, h))?, normal((mi, h))?, normal((h, mi))?)))
                .collect::<Result<Vec<_>>>()?;
            // Biases where the family has them (gpt-oss).
            let biases = match layout.stored {
                ExpertStorage::Interleaved => {
                    let mut bias = |n: usize| -> Result<Tensor> { Ok(normal((1, n))?.squeeze(0)?) };
                    Some(Biases {
                        router: bias(moe.experts)?,
                        experts: (0..moe.experts)
                            .map(|_| Ok((bias(mi)?, bias(mi)?, bias(h)?)))
                            .collect::<Result<Vec<_>>>()?,
                    })
                }
                _ => None,
            };
            t.extend(crate::train::model::moe::stored_layout(layout, l, router, experts, biases)?);
        }
        if arch.attn_sinks {
            // gpt-oss: q/k/v/o biases, and the sinks (a logit per head, std 1).
            for (n, len) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv), ("o_proj", h)] {
                t.insert(format!("{p}.self_attn.{n}.bias"), normal((1, len))?.squeeze(0)?);
            }
            t.insert(format!("{p}.self_attn.sinks"), (normal((1, config.num_attention_heads))?.squeeze(0)? * 50.0)?);
        }
        for n in family.norms.iter().flatten() {
            t.insert(format!("{p}.{n}.weight"), unit(h)?);
        }
        if let Some((qn, kn)) = qk_norm {
            t.insert(format!("{p}.self_attn.q_norm.weight"), unit(qn)?);
            t.insert(format!("{p}.self_attn.k_norm.weight"), unit(kn)?);
        }
    }
    if !config.tie_word_embeddings {
        t.insert("lm_head.weight".into(), normal((v, h))?);
    }
    std::fs::create_dir_all(out)?;
    candle_core::safetensors::save(&t, out.join("model.safetensors"))?;
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(config)?)?;
    Ok(())
}
