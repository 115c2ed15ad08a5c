//! llama.cpp's names: the architecture a Hugging Face `model_type` is written as (and whether
//! llama.cpp keeps its q/k rows in rotary order), the pre-tokenizer it names for a family, and its
//! tensor names against Hugging Face's. A new model family adds its rows here.

use anyhow::{bail, Result};

/// How llama.cpp knows a model family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Architecture {
    /// `general.architecture` and the prefix of the shape keys (`llama.block_count`).
    pub name: &'static str,
    /// Whether llama.cpp keeps q_proj/k_proj rows in its own rotary order ([`super::rotary`]).
    pub rotary_order: bool,
}

/// llama.cpp's architecture for a Hugging Face `model_type`.
pub fn architecture(model_type: &str) -> Result<Architecture> {
    let (name, rotary_order) = match model_type {
        "llama" | "mistral" => ("llama", true),
        "qwen2" => ("qwen2", false),
        "qwen3" => ("qwen3", false),
        other => bail!("model_type '{other}': llama.cpp export supports llama, mistral, qwen2 and qwen3"),
    };
    Ok(Architecture { name, rotary_order })
}

/// llama.cpp's name for the pre-tokenizer of a model family (convert_hf_to_gguf.py identifies it
/// by hashing a tokenization; here by family and vocabulary size).
pub fn pre_tokenizer(model_type: &str, vocab_size: usize) -> &'static str {
    match model_type {
        "qwen2" | "qwen3" => "qwen2",
        _ if vocab_size >= 128_000 => "llama-bpe",
        _ => "default",
    }
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

/// A layer's other tensors llama.cpp names (Qwen3's q/k norms, Qwen2's biases), after `blk.N.`.
const LAYER_EXTRAS: [(&str, &str); 5] = [
    ("self_attn.q_norm.weight", "attn_q_norm.weight"),
    ("self_attn.k_norm.weight", "attn_k_norm.weight"),
    ("self_attn.q_proj.bias", "attn_q.bias"),
    ("self_attn.k_proj.bias", "attn_k.bias"),
    ("self_attn.v_proj.bias", "attn_v.bias"),
];

/// The model's tensors outside the layers: Hugging Face name -> llama.cpp's.
const MODEL_TENSORS: [(&str, &str); 3] = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// A projection's short name (`q_proj`, as PEFT's targets say) -> its path in a layer (`self_attn.q_proj`).
pub fn projection_path(m: &str) -> &'static str {
    match m {
        "q_proj" => "self_attn.q_proj",
        "k_proj" => "self_attn.k_proj",
        "v_proj" => "self_attn.v_proj",
        "o_proj" => "self_attn.o_proj",
        "gate_proj" => "mlp.gate_proj",
        "up_proj" => "mlp.up_proj",
        _ => "mlp.down_proj",
    }
}

/// Hugging Face module path within a layer (`self_attn.q_proj`) -> llama.cpp's (`attn_q`).
pub fn hf_module_to_gguf(module: &str) -> Option<&'static str> {
    LAYER_TENSORS.iter().find(|(h, _)| *h == module).map(|(_, g)| *g)
}

/// Hugging Face name of a layer's weight (`model.layers.3.self_attn.q_proj.weight`) -> llama.cpp's
/// (`blk.3.attn_q.weight`).
pub fn hf_to_gguf(name: &str) -> Option<String> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, t) = rest.split_once('.')?;
    let g = hf_module_to_gguf(t.strip_suffix(".weight")?)?;
    Some(format!("blk.{layer}.{g}.weight"))
}

/// Any tensor of a Llama-family checkpoint (embedding, norms, layer weights, q/k norms, biases) ->
/// its llama.cpp name, or None for one llama.cpp does not keep.
pub fn tensor_to_gguf(hf: &str) -> Option<String> {
    if let Some((_, g)) = MODEL_TENSORS.iter().find(|(h, _)| *h == hf) {
        return Some(g.to_string());
    }
    if let Some(n) = hf_to_gguf(hf) {
        return Some(n);
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, t) = rest.split_once('.')?;
    let g = LAYER_EXTRAS.iter().find(|(h, _)| *h == t)?.1;
    Some(format!("blk.{layer}.{g}"))
}

/// llama.cpp tensor name -> Hugging Face name (the final norm, the head and the layers' weights).
pub fn gguf_to_hf(name: &str) -> Option<String> {
    if let Some((h, _)) = MODEL_TENSORS[1..].iter().find(|(_, g)| *g == name) {
        return Some(h.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, t) = rest.split_once('.')?;
    let gguf = t.strip_suffix(".weight")?;
    let hf = LAYER_TENSORS.iter().find(|(_, g)| *g == gguf)?.0;
    Some(format!("model.layers.{layer}.{hf}.weight"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_go_both_ways() {
        for hf in ["model.layers.3.self_attn.q_proj.weight", "model.norm.weight", "lm_head.weight"] {
            let g = tensor_to_gguf(hf).unwrap();
            assert_eq!(gguf_to_hf(&g).as_deref(), Some(hf), "{hf} -> {g}");
        }
        assert_eq!(
            tensor_to_gguf("model.layers.0.self_attn.k_norm.weight").as_deref(),
            Some("blk.0.attn_k_norm.weight")
        );
        assert_eq!(tensor_to_gguf("model.embed_tokens.weight").as_deref(), Some("token_embd.weight"));
        // The embedding is read by name, not through the layer table.
        assert_eq!(gguf_to_hf("token_embd.weight"), None);
        assert_eq!(tensor_to_gguf("model.layers.0.self_attn.rotary_emb.inv_freq"), None);
        assert_eq!(hf_module_to_gguf(projection_path("down_proj")), Some("ffn_down"));
    }

    #[test]
    fn architectures() {
        assert_eq!(architecture("mistral").unwrap(), Architecture { name: "llama", rotary_order: true });
        assert!(!architecture("qwen3").unwrap().rotary_order);
        assert!(architecture("gemma3").unwrap_err().to_string().contains("llama.cpp export supports"));
    }
}
