//! GGUF base models (llama.cpp's files): metadata to a model config, llama.cpp tensor names mapped
//! back to Hugging Face's, and Q/K rows put back from llama.cpp's rotary order (both from
//! [`crate::gguf`]); tensors dequantised to f32, or kept in the file's own blocks for QLoRA
//! (`--qlora gguf`).

use super::Qlora;
use crate::gguf::metadata::{f64_of, open, string_of, u32_of, usize_of};
use crate::gguf::rotary::{from_gguf, permute_rows, unpermute_rows};
use crate::train::model::base::{is_projection, nf4_of, BaseModel};
use crate::train::model::config::ModelConfig;
use crate::train::model::config::RopeScaling;
use crate::train::model::family::{of_gguf_experts, of_model_type, ExpertStorage, Family};
use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, QStorage, QTensor};
use candle_core::Device;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// The model's shape from a GGUF file's metadata (llama.cpp names: `{arch}.block_count` and the
/// rest, then the family's own keys), without reading its tensors.
pub fn config_of(content: &gguf_file::Content, path: &Path) -> Result<ModelConfig> {
    let md = &content.metadata;
    let arch = string_of(md, "general.architecture").unwrap_or_default();
    let experts = usize_of(md, &format!("{arch}.expert_count")).unwrap_or(0);
    let family = of_gguf_experts(&arch, experts > 0).with_context(|| path.display().to_string())?;
    if experts > 0 && !matches!(family.moe.map(|m| &m.stored), Some(ExpertStorage::PerExpert { .. })) {
        bail!(
            "{}: a {} mixture of experts in GGUF is not read as a base here (Qwen3-MoE, OLMoE and Mixtral are); \
             train from the model's Hugging Face directory",
            path.display(),
            family.name
        );
    }
    let Some(embd) = content.tensor_infos.get("token_embd.weight") else {
        bail!("{}: no token_embd.weight tensor", path.display());
    };
    let (vocab, hidden) = embd.shape.dims2()?;
    let key = |k: &str| format!("{arch}.{k}");
    let n_head = usize_of(md, &key("attention.head_count"))?;
    let n_kv = usize_of(md, &key("attention.head_count_kv")).unwrap_or(n_head);
    let mut config = ModelConfig {
        model_type: family.model_types[0].into(),
        hidden_size: hidden,
        intermediate_size: usize_of(md, &key("feed_forward_length"))?,
        num_hidden_layers: usize_of(md, &key("block_count"))?,
        num_attention_heads: n_head,
        num_key_value_heads: Some(n_kv),
        head_dim: usize_of(md, &key("attention.key_length")).ok(),
        vocab_size: vocab,
        rms_norm_eps: f64_of(md, &key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        rope_theta: f64_of(md, &key("rope.freq_base")).unwrap_or(10_000.0),
        rope_scaling: None,
        rope_parameters: None,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        attention_bias: Some(content.tensor_infos.contains_key("blk.0.attn_q.bias")),
        max_position_embeddings: usize_of(md, &key("context_length")).unwrap_or(2048),
        bos_token_id: u32_of(md, "tokenizer.ggml.bos_token_id").map(serde_json::Value::from),
        eos_token_id: u32_of(md, "tokenizer.ggml.eos_token_id").map(serde_json::Value::from),
        hidden_act: Some("silu".into()),
        extra: Default::default(),
    };
    // llama.cpp's rope scaling: linear is read; YaRN and the others are not yet (they would be
    // computed as plain rope).
    match string_of(md, &key("rope.scaling.type")).as_deref() {
        None | Some("none") => {}
        Some("linear") => {
            config.rope_scaling = Some(RopeScaling {
                rope_type: Some("linear".into()),
                factor: f64_of(md, &key("rope.scaling.factor")),
                ..serde_json::from_value(serde_json::json!({}))?
            })
        }
        Some(other) => bail!(
            "{}: rope scaling '{other}' in a GGUF base is not read here; train from the Hugging Face directory",
            path.display()
        ),
    }
    if experts > 0 {
        // llama.cpp's MoE keys as the family's config keys; llama.cpp's qwen3moe always renormalises the
        // top-k weights, its olmoe never.
        let used = usize_of(md, &key("expert_used_count"))?;
        let width = usize_of(md, &key("expert_feed_forward_length")).unwrap_or(config.intermediate_size);
        let keys = match family.model_types[0] {
            "mixtral" => serde_json::json!({"num_local_experts": experts, "num_experts_per_tok": used}),
            t => serde_json::json!({"num_experts": experts, "num_experts_per_tok": used,
                "moe_intermediate_size": width, "norm_topk_prob": t == "qwen3_moe"}),
        };
        config.extra.extend(keys.as_object().expect("an object").clone());
    }
    (family.from_gguf)(content, &mut config).with_context(|| path.display().to_string())?;
    config.check().with_context(|| path.display().to_string())?;
    crate::train::model::family::describe(&config).with_context(|| path.display().to_string())?;
    Ok(config)
}

/// The shape of the GGUF model at `path`, reading only its header.
pub fn read_config(path: &Path) -> Result<ModelConfig> {
    config_of(&open(path)?.1, path)
}

pub fn load_gguf(path: &Path, device: &Device, qlora: Option<Qlora>) -> Result<BaseModel> {
    let (mut file, content) = open(path)?;
    let config = config_of(&content, path)?;
    let family = of_model_type(&config.model_type)?;
    let naming = family.gguf;
    let (n_head, n_kv) = (config.num_attention_heads, config.kv_heads());
    let embd = content.tensor(&mut file, "token_embd.weight", device)?.dequantize(device)?;
    let mut tensors = HashMap::new();
    let (mut nf4_map, mut quantized) = (HashMap::new(), HashMap::new());
    tensors.insert("model.embed_tokens.weight".to_string(), embd);
    let names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    for name in names {
        if let Some((layer, part)) = expert_tensor(&name) {
            // Stacked experts [E, rows, cols]: one tensor per expert under the family's names.
            let q = content.tensor(&mut file, &name, device)?;
            for (e, one) in split_experts(&q)?.into_iter().enumerate() {
                let hf = expert_name(family, layer, e, part)?;
                if qlora == Some(Qlora::Gguf) {
                    quantized.insert(hf.trim_end_matches(".weight").to_string(), Arc::new(one));
                    continue;
                }
                let t = one.dequantize(device)?;
                match qlora {
                    Some(Qlora::Nf4) => drop(nf4_map.insert(hf.trim_end_matches(".weight").to_string(), nf4_of(&t)?)),
                    _ => drop(tensors.insert(hf, t)),
                }
            }
            continue;
        }
        let hf = match naming.gguf_to_hf(&name) {
            Some(n) => n,
            None if name == "token_embd.weight" => continue,
            None => continue, // rope_freqs and other derived tensors
        };
        let heads = if !naming.rotary_order {
            None
        } else if name.ends_with("attn_q.weight") {
            Some(n_head)
        } else if name.ends_with("attn_k.weight") {
            Some(n_kv)
        } else {
            None
        };
        let q = content.tensor(&mut file, &name, device)?;
        if qlora == Some(Qlora::Gguf) && is_projection(&hf) {
            // Keep the file's blocks; move whole quantised rows back to Hugging Face order.
            let q = match heads {
                Some(h) => permute_rows(&q, &unpermute_rows(q.shape().dims2()?.0, h))?,
                None => q,
            };
            quantized.insert(hf.trim_end_matches(".weight").to_string(), Arc::new(q));
            continue;
        }
        let mut t = q.dequantize(device)?;
        if let Some(h) = heads {
            t = from_gguf(&t, h)?;
        }
        if family.norm_offset != 0.0 && is_norm(&hf) {
            // llama.cpp stores Gemma's norms as applied (1 + w); Hugging Face's w is what the base holds.
            t = (t - family.norm_offset)?;
        }
        if qlora == Some(Qlora::Nf4) && is_projection(&hf) {
            nf4_map.insert(hf.trim_end_matches(".weight").to_string(), nf4_of(&t)?);
        } else {
            tensors.insert(hf, t);
        }
    }
    Ok(BaseModel {
        config,
        tensors,
        nf4: nf4_map,
        quantized,
        qlora: qlora.is_some(),
        source: path.to_path_buf(),
        gguf_metadata: Some(content.metadata),
    })
}

/// A llama.cpp stacked expert tensor's (layer, `gate`/`up`/`down`): `blk.{l}.ffn_{part}_exps.weight`.
fn expert_tensor(name: &str) -> Option<(usize, &'static str)> {
    let (layer, rest) = name.strip_prefix("blk.")?.split_once('.')?;
    let part = ["gate", "up", "down"].into_iter().find(|p| rest == format!("ffn_{p}_exps.weight"))?;
    Some((layer.parse().ok()?, part))
}

/// Expert `e`'s `part` in layer `layer` under the family's per-expert Hugging Face name.
fn expert_name(family: &Family, layer: usize, e: usize, part: &str) -> Result<String> {
    let Some(ExpertStorage::PerExpert { block, gate, up, down, .. }) = family.moe.map(|m| &m.stored) else {
        bail!("{} keeps no per-expert tensors", family.name);
    };
    let n = match part {
        "gate" => gate,
        "up" => up,
        _ => down,
    };
    Ok(format!("model.layers.{layer}.{block}.experts.{e}.{n}.weight"))
}

/// A stacked [E, rows, cols] tensor as E tensors [rows, cols] in the same blocks (each expert's
/// rows are contiguous in the file).
fn split_experts(q: &QTensor) -> Result<Vec<QTensor>> {
    let (e, rows, cols) = q.shape().dims3()?;
    let data = q.data()?;
    let per = data.len() / e;
    (0..e)
        .map(|x| {
            let bytes = std::borrow::Cow::Owned(data[x * per..(x + 1) * per].to_vec());
            let storage = QStorage::from_data(bytes, &Device::Cpu, q.dtype())?;
            Ok(QTensor::new(storage, (rows, cols))?)
        })
        .collect()
}

/// Whether a Hugging Face tensor name is a norm's weight.
fn is_norm(hf: &str) -> bool {
    hf.ends_with("norm.weight") || hf.ends_with("layernorm.weight")
}
