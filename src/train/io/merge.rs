//! Merging: fold a LoRA adapter into the base weights (W + s * B A) and write a Hugging
//! Face model directory (config.json + model.safetensors) that any loader reads without PEFT.

use crate::train::model::Model;
use anyhow::Result;
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

pub fn write_hf(model: &Model, out: &Path) -> Result<usize> {
    std::fs::create_dir_all(out)?;
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert("model.embed_tokens.weight".into(), model.embed.clone());
    t.insert("model.norm.weight".into(), model.norm.clone());
    if !model.config.tie_word_embeddings {
        t.insert("lm_head.weight".into(), model.lm_head.dense_weight()?);
    }
    let mut merged = 0;
    for (i, l) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        t.insert(format!("{p}.input_layernorm.weight"), l.input_norm.clone());
        t.insert(format!("{p}.post_attention_layernorm.weight"), l.post_norm.clone());
        if let (Some(q), Some(k)) = (&l.q_norm, &l.k_norm) {
            t.insert(format!("{p}.self_attn.q_norm.weight"), q.clone());
            t.insert(format!("{p}.self_attn.k_norm.weight"), k.clone());
        }
        for lin in l.linears() {
            merged += lin.lora.is_some() as usize;
            t.insert(format!("{}.weight", lin.name), lin.merged_weight()?);
            if let Some(b) = &lin.bias {
                t.insert(format!("{}.bias", lin.name), b.clone());
            }
        }
    }
    let tmp = out.join(".model.safetensors.partial");
    candle_core::safetensors::save(&t, &tmp)?;
    std::fs::rename(&tmp, out.join("model.safetensors"))?;
    let mut cfg = serde_json::to_value(&model.config)?;
    cfg["architectures"] = serde_json::json!([match model.config.model_type.as_str() {
        "qwen2" => "Qwen2ForCausalLM",
        "qwen3" => "Qwen3ForCausalLM",
        "mistral" => "MistralForCausalLM",
        _ => "LlamaForCausalLM",
    }]);
    cfg["torch_dtype"] = serde_json::json!("float32");
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    Ok(merged)
}
