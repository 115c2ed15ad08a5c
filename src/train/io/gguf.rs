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
use crate::train::model::family::{of_gguf, of_model_type};
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::Device;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// The model's shape from a GGUF file's metadata (llama.cpp names: `{arch}.block_count` and the
/// rest, then the family's own keys), without reading its tensors.
pub fn config_of(content: &gguf_file::Content, path: &Path) -> Result<ModelConfig> {
    let md = &content.metadata;
    let arch = string_of(md, "general.architecture").unwrap_or_default();
    let family = of_gguf(&arch).with_context(|| path.display().to_string())?;
    if family.moe.is_some() || usize_of(md, &format!("{arch}.expert_count")).is_ok_and(|n| n > 0) {
        bail!(
            "{}: a mixture of experts in GGUF is not read as a base here (its experts are in llama.cpp's stacked \
             blocks); train from the model's Hugging Face directory, and `export gguf --merge` the result",
            path.display()
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

/// Whether a Hugging Face tensor name is a norm's weight.
fn is_norm(hf: &str) -> bool {
    hf.ends_with("norm.weight") || hf.ends_with("layernorm.weight")
}
