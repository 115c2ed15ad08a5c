//! Merging: fold a LoRA adapter into the base weights (W + s * B A) and write a Hugging
//! Face model directory (config.json + model.safetensors) that any loader reads without PEFT.

use crate::train::model::layer::Mlp;
use crate::train::model::Model;
use anyhow::Result;
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

pub fn write_hf(model: &Model, out: &Path) -> Result<usize> {
    std::fs::create_dir_all(out)?;
    let family = model.family;
    // Norms are held as applied; Hugging Face stores them without the family's offset (Gemma's 1 + w).
    let stored = |w: &Tensor| -> Result<Tensor> {
        Ok(match family.norm_offset {
            0.0 => w.clone(),
            o => (w - o)?,
        })
    };
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert("model.embed_tokens.weight".into(), model.embed.clone());
    t.insert("model.norm.weight".into(), stored(&model.norm)?);
    if !model.config.tie_word_embeddings {
        t.insert("lm_head.weight".into(), model.lm_head.dense_weight()?);
    }
    let mut merged = 0;
    for (i, l) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        for (name, w) in family.norms.iter().zip(&l.norms) {
            if let (Some(name), Some(w)) = (name, w) {
                t.insert(format!("{p}.{name}.weight"), stored(w)?);
            }
        }
        if let (Some(q), Some(k)) = (&l.q_norm, &l.k_norm) {
            t.insert(format!("{p}.self_attn.q_norm.weight"), stored(q)?);
            t.insert(format!("{p}.self_attn.k_norm.weight"), stored(k)?);
        }
        if let Some(sinks) = &l.sinks {
            t.insert(format!("{p}.self_attn.sinks"), sinks.clone());
        }
        for lin in l.linears() {
            merged += lin.lora.is_some() as usize;
            t.insert(format!("{}.weight", lin.name), lin.merged_weight()?);
            if let Some(b) = &lin.bias {
                t.insert(format!("{}.bias", lin.name), b.clone());
            }
        }
        if let Mlp::Sparse(moe) = &l.mlp {
            merged += moe.adapters().iter().map(|(_, per_expert)| per_expert.len()).sum::<usize>();
            t.extend(moe.stored_tensors(i)?);
        }
    }
    let tmp = out.join(".model.safetensors.partial");
    candle_core::safetensors::save(&t, &tmp)?;
    std::fs::rename(&tmp, out.join("model.safetensors"))?;
    let mut cfg = serde_json::to_value(&model.config)?;
    // transformers reads an absent key as its default but a null one as None (a null head_dim breaks
    // OLMo 2's attention): write the head width resolved and leave the other unset keys out.
    cfg["head_dim"] = serde_json::json!(model.config.head_dim());
    if let Some(map) = cfg.as_object_mut() {
        map.retain(|_, v| !v.is_null());
    }
    let class = family.model_types.iter().position(|m| *m == model.config.model_type).unwrap_or(0);
    cfg["architectures"] = serde_json::json!([family.hf_classes[class]]);
    cfg["torch_dtype"] = serde_json::json!("float32");
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    Ok(merged)
}
