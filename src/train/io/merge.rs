//! Merging: fold a LoRA adapter into the base weights (W + s * B A) and write a Hugging
//! Face model directory (config.json + model.safetensors, or shards above [`MAX_SHARD_BYTES`]
//! with their index, as transformers' `save_pretrained`) that any loader reads without PEFT.

use crate::train::model::layer::Mlp;
use crate::train::model::Model;
use anyhow::Result;
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

/// transformers' `save_pretrained` default `max_shard_size` ("5GB").
pub const MAX_SHARD_BYTES: usize = 5_000_000_000;

/// Writes the model's weights (adapters merged) and config.json to `out`; returns how many
/// adapted modules were merged.
pub fn write_hf(model: &Model, out: &Path) -> Result<usize> {
    write_hf_sharded(model, out, MAX_SHARD_BYTES)
}

/// As [`write_hf`], with shards of at most `max_shard_bytes` (one tensor may exceed it alone).
pub fn write_hf_sharded(model: &Model, out: &Path, max_shard_bytes: usize) -> Result<usize> {
    std::fs::create_dir_all(out)?;
    let (t, merged) = hf_tensors(model)?;
    save_sharded(t, out, max_shard_bytes)?;
    write_config(model, out)?;
    Ok(merged)
}

/// The model's tensors under their Hugging Face names, as its family's checkpoints store them
/// (adapters merged, norms without the family's offset), and the number of merged modules.
fn hf_tensors(model: &Model) -> Result<(HashMap<String, Tensor>, usize)> {
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
    match &model.score {
        // A reward model: transformers' ...ForSequenceClassification, its head `score`, no LM head.
        Some(score) => {
            t.insert("score.weight".into(), score.as_tensor().clone());
        }
        None if !model.config.tie_word_embeddings => {
            t.insert("lm_head.weight".into(), model.lm_head.dense_weight()?);
        }
        None => {}
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
    Ok((t, merged))
}

/// Saves `t` as model.safetensors, or as `model-0000i-of-0000n.safetensors` shards of at most
/// `max_bytes` each (in name order) with model.safetensors.index.json; each file written under a
/// temporary name and renamed, stale files of an earlier layout removed.
fn save_sharded(t: HashMap<String, Tensor>, out: &Path, max_bytes: usize) -> Result<()> {
    let bytes = |x: &Tensor| x.elem_count() * x.dtype().size_in_bytes();
    let total: usize = t.values().map(bytes).sum();
    let mut names: Vec<&String> = t.keys().collect();
    names.sort();
    let mut shards: Vec<Vec<&String>> = vec![vec![]];
    let mut size = 0;
    for n in names {
        let b = bytes(&t[n]);
        if size + b > max_bytes && !shards.last().is_some_and(|s| s.is_empty()) {
            shards.push(vec![]);
            size = 0;
        }
        shards.last_mut().expect("one shard at least").push(n);
        size += b;
    }
    for old in std::fs::read_dir(out)?.flatten() {
        let name = old.file_name().to_string_lossy().to_string();
        if name.starts_with("model") && (name.ends_with(".safetensors") || name.ends_with(".index.json")) {
            std::fs::remove_file(old.path())?;
        }
    }
    let save = |file: &str, names: &[&String]| -> Result<()> {
        let part: HashMap<String, Tensor> = names.iter().map(|n| (n.to_string(), t[*n].clone())).collect();
        let tmp = out.join(format!(".{file}.partial"));
        candle_core::safetensors::save(&part, &tmp)?;
        std::fs::rename(&tmp, out.join(file))?;
        Ok(())
    };
    if shards.len() == 1 {
        return save("model.safetensors", &shards[0]);
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, names) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        save(&file, names)?;
        for name in names {
            weight_map.insert(name.to_string(), serde_json::json!(file));
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(out.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index)?)?;
    Ok(())
}

/// config.json as transformers reads it: the head width resolved, unset keys left out, the
/// family's class and f32.
fn write_config(model: &Model, out: &Path) -> Result<()> {
    let family = model.family;
    let mut cfg = serde_json::to_value(&model.config)?;
    // transformers reads an absent key as its default but a null one as None (a null head_dim breaks
    // OLMo 2's attention): write the head width resolved and leave the other unset keys out.
    cfg["head_dim"] = serde_json::json!(model.config.head_dim());
    if let Some(map) = cfg.as_object_mut() {
        map.retain(|_, v| !v.is_null());
    }
    let class = family.model_types.iter().position(|m| *m == model.config.model_type).unwrap_or(0);
    cfg["architectures"] = serde_json::json!([family.hf_classes[class]]);
    if model.score.is_some() {
        let classifier = family.hf_classes[class].replace("ForCausalLM", "ForSequenceClassification");
        cfg["architectures"] = serde_json::json!([classifier]);
        cfg["num_labels"] = serde_json::json!(1);
        cfg["id2label"] = serde_json::json!({"0": "LABEL_0"});
        cfg["label2id"] = serde_json::json!({"LABEL_0": 0});
    }
    cfg["torch_dtype"] = serde_json::json!("float32");
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    Ok(())
}
