//! GGUF base models (llama.cpp's files): metadata to a model config, llama.cpp tensor names mapped
//! back to Hugging Face's, and Q/K rows put back from llama.cpp's rotary order; tensors dequantised
//! to f32, or kept in the file's own blocks for QLoRA (`--qlora gguf`).

use crate::train::model::base::{is_projection, nf4_of, BaseModel};
use crate::train::model::config::ModelConfig;
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

fn md_u(md: &HashMap<String, gguf_file::Value>, key: &str) -> Result<usize> {
    md.get(key)
        .with_context(|| format!("GGUF metadata has no '{key}'"))?
        .to_u32()
        .map(|v| v as usize)
        .map_err(Into::into)
}

fn md_f(md: &HashMap<String, gguf_file::Value>, key: &str) -> Option<f64> {
    md.get(key).and_then(|v| v.to_f32().ok()).map(|v| v as f64)
}

/// Undoes llama.cpp's rotary row permutation of q_proj/k_proj.
fn unpermute(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    Ok(w.reshape((n_head, out / n_head / 2, 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

/// The model's shape from a GGUF file's metadata (llama.cpp names), without reading its tensors.
pub fn config_of(content: &gguf_file::Content, path: &Path) -> Result<ModelConfig> {
    let md = &content.metadata;
    let arch = md.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
    if arch != "llama" {
        bail!("{}: GGUF architecture '{arch}' is not supported (llama)", path.display());
    }
    let Some(embd) = content.tensor_infos.get("token_embd.weight") else {
        bail!("{}: no token_embd.weight tensor", path.display());
    };
    let (vocab, hidden) = embd.shape.dims2()?;
    let n_head = md_u(md, "llama.attention.head_count")?;
    let n_kv = md_u(md, "llama.attention.head_count_kv").unwrap_or(n_head);
    let config = ModelConfig {
        model_type: "llama".into(),
        hidden_size: hidden,
        intermediate_size: md_u(md, "llama.feed_forward_length")?,
        num_hidden_layers: md_u(md, "llama.block_count")?,
        num_attention_heads: n_head,
        num_key_value_heads: Some(n_kv),
        head_dim: md_u(md, "llama.attention.key_length").ok(),
        vocab_size: vocab,
        rms_norm_eps: md_f(md, "llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        rope_theta: md_f(md, "llama.rope.freq_base").unwrap_or(10_000.0),
        rope_scaling: None,
        rope_parameters: None,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        attention_bias: Some(false),
        max_position_embeddings: md_u(md, "llama.context_length").unwrap_or(2048),
        bos_token_id: md.get("tokenizer.ggml.bos_token_id").and_then(|v| v.to_u32().ok()).map(serde_json::Value::from),
        eos_token_id: md.get("tokenizer.ggml.eos_token_id").and_then(|v| v.to_u32().ok()).map(serde_json::Value::from),
        hidden_act: Some("silu".into()),
    };
    config.check()?;
    Ok(config)
}

/// The shape of the GGUF model at `path`, reading only its header.
pub fn read_config(path: &Path) -> Result<ModelConfig> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let content =
        gguf_file::Content::read(&mut file).with_context(|| format!("{}: not a GGUF file", path.display()))?;
    config_of(&content, path)
}

pub fn load_gguf(path: &Path, device: &Device, qlora: Option<&str>) -> Result<BaseModel> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let content =
        gguf_file::Content::read(&mut file).with_context(|| format!("{}: not a GGUF file", path.display()))?;
    let config = config_of(&content, path)?;
    let (n_head, n_kv) = (config.num_attention_heads, config.kv_heads());
    let embd = content.tensor(&mut file, "token_embd.weight", device)?.dequantize(device)?;
    let mut tensors = HashMap::new();
    let (mut nf4_map, mut quantized) = (HashMap::new(), HashMap::new());
    tensors.insert("model.embed_tokens.weight".to_string(), embd);
    let names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    for name in names {
        let hf = match gguf_to_hf(&name) {
            Some(n) => n,
            None if name == "token_embd.weight" => continue,
            None => continue, // rope_freqs and other derived tensors
        };
        let heads = if name.ends_with("attn_q.weight") {
            Some(n_head)
        } else if name.ends_with("attn_k.weight") {
            Some(n_kv)
        } else {
            None
        };
        let q = content.tensor(&mut file, &name, device)?;
        if qlora == Some("gguf") && is_projection(&hf) {
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
            t = unpermute(&t, h)?;
        }
        if qlora == Some("nf4") && is_projection(&hf) {
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
        source: path.to_path_buf(),
        gguf_metadata: Some(content.metadata),
    })
}

/// A layer's tensors: Hugging Face module path -> llama.cpp name (both before `.weight`).
const LAYER_TENSORS: [(&str, &str); 9] = [
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

/// Hugging Face module path within a layer (`self_attn.q_proj`) -> llama.cpp's (`attn_q`).
pub fn hf_module_to_gguf(module: &str) -> Option<&'static str> {
    LAYER_TENSORS.iter().find(|(h, _)| *h == module).map(|(_, g)| *g)
}

/// Hugging Face name of a layer tensor (`model.layers.3.self_attn.q_proj.weight`) -> llama.cpp's
/// (`blk.3.attn_q.weight`).
pub fn hf_to_gguf(name: &str) -> Option<String> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, t) = rest.split_once('.')?;
    let g = hf_module_to_gguf(t.strip_suffix(".weight")?)?;
    Some(format!("blk.{layer}.{g}.weight"))
}

/// llama.cpp tensor name -> Hugging Face name.
pub fn gguf_to_hf(name: &str) -> Option<String> {
    if name == "output_norm.weight" {
        return Some("model.norm.weight".into());
    }
    if name == "output.weight" {
        return Some("lm_head.weight".into());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, t) = rest.split_once('.')?;
    let gguf = t.strip_suffix(".weight")?;
    let hf = LAYER_TENSORS.iter().find(|(_, g)| *g == gguf)?.0;
    Some(format!("model.layers.{layer}.{hf}.weight"))
}

/// Reorders whole rows of a quantised matrix (rows are independent runs of blocks), without
/// re-quantising: `out[r] = in[src[r]]`.
pub fn permute_rows(
    q: &candle_core::quantized::QTensor,
    src: &[usize],
) -> candle_core::Result<candle_core::quantized::QTensor> {
    let (rows, cols) = q.shape().dims2()?;
    let dtype = q.dtype();
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    let mut out = vec![0u8; rows * row_bytes];
    for (r, &s) in src.iter().enumerate() {
        out[r * row_bytes..(r + 1) * row_bytes].copy_from_slice(&data[s * row_bytes..(s + 1) * row_bytes]);
    }
    let storage =
        candle_core::quantized::QStorage::from_data(std::borrow::Cow::Owned(out), &candle_core::Device::Cpu, dtype)?;
    candle_core::quantized::QTensor::new(storage, (rows, cols))
}

/// llama.cpp's rotary row order back to Hugging Face's: HF row `h*hd + b*hd/2 + a` is GGUF row
/// `h*hd + 2a + b`.
pub fn unpermute_rows(rows: usize, n_head: usize) -> Vec<usize> {
    let hd = rows / n_head;
    let mut src = vec![0; rows];
    for h in 0..n_head {
        for a in 0..hd / 2 {
            for b in 0..2 {
                src[h * hd + b * (hd / 2) + a] = h * hd + 2 * a + b;
            }
        }
    }
    src
}
