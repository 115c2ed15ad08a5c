//! llama.cpp's names: a family's architecture name, whether it keeps q/k rows in rotary order and
//! its tensor names against Hugging Face's ([`Naming`], one per family file), and the pre-tokenizer
//! it names for a family.

/// How llama.cpp knows a model family: its architecture name (`general.architecture`, the prefix
/// of the shape keys), whether it keeps q/k rows in its rotary order ([`super::rotary`]), and its
/// names of a layer's tensors. Each family file (`train::model::family`) holds one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Naming {
    pub name: &'static str,
    pub rotary_order: bool,
    /// A layer's tensors, Hugging Face module path -> llama.cpp's (before `.weight` / `.bias`), in
    /// tables (the projections most families share, then the family's norms).
    pub layer: &'static [&'static [(&'static str, &'static str)]],
}

/// The projections and q/k norms of a Llama-like layer, as most families name them.
pub const PROJECTIONS: &[(&str, &str)] = &[
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
    ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"),
];

/// Llama's two norms: before attention and before the MLP (which Hugging Face calls "post attention").
pub const PRE_NORMS: &[(&str, &str)] = &[("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")];

/// The router of a mixture of experts in a block named `mlp` (Qwen3-MoE, OLMoE).
pub const MLP_ROUTER: &[(&str, &str)] = &[("mlp.gate", "ffn_gate_inp")];

/// The router of Mixtral's `block_sparse_moe`.
pub const BLOCK_SPARSE_ROUTER: &[(&str, &str)] = &[("block_sparse_moe.gate", "ffn_gate_inp")];

/// The router of Granite-MoE's `block_sparse_moe`.
pub const GRANITE_ROUTER: &[(&str, &str)] = &[("block_sparse_moe.router.layer", "ffn_gate_inp")];

/// gpt-oss's norms: llama.cpp calls the one before the experts the post-attention norm.
pub const GPT_OSS_NORMS: &[(&str, &str)] =
    &[("input_layernorm", "attn_norm"), ("post_attention_layernorm", "post_attention_norm")];

/// gpt-oss's router (with a bias) and attention sinks.
pub const GPT_OSS_LAYER: &[(&str, &str)] = &[("mlp.router", "ffn_gate_inp"), ("self_attn.sinks", "attn_sinks")];

/// The model's tensors outside the layers: Hugging Face name -> llama.cpp's.
const MODEL_TENSORS: [(&str, &str); 3] = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

impl Naming {
    fn layer_pairs(&self) -> impl Iterator<Item = &(&'static str, &'static str)> {
        self.layer.iter().flat_map(|t| t.iter())
    }

    /// Hugging Face module path within a layer (`self_attn.q_proj`) -> llama.cpp's (`attn_q`).
    pub fn module_to_gguf(&self, module: &str) -> Option<&'static str> {
        self.layer_pairs().find(|(h, _)| *h == module).map(|(_, g)| *g)
    }

    /// Hugging Face name of a layer's weight or bias (`model.layers.3.self_attn.q_proj.weight`) ->
    /// llama.cpp's (`blk.3.attn_q.weight`).
    pub fn hf_to_gguf(&self, name: &str) -> Option<String> {
        let rest = name.strip_prefix("model.layers.")?;
        let (layer, t) = rest.split_once('.')?;
        let (module, kind) = t.rsplit_once('.')?;
        if kind != "weight" && kind != "bias" {
            return None;
        }
        Some(format!("blk.{layer}.{}.{kind}", self.module_to_gguf(module)?))
    }

    /// Any tensor of a checkpoint of this family -> its llama.cpp name, or None for one llama.cpp
    /// does not keep.
    pub fn tensor_to_gguf(&self, hf: &str) -> Option<String> {
        match MODEL_TENSORS.iter().find(|(h, _)| *h == hf) {
            Some((_, g)) => Some(g.to_string()),
            None => self.hf_to_gguf(hf),
        }
    }

    /// llama.cpp tensor name -> Hugging Face name (the final norm, the head and the layers'
    /// tensors; the embedding is read by name).
    pub fn gguf_to_hf(&self, name: &str) -> Option<String> {
        if let Some((h, _)) = MODEL_TENSORS[1..].iter().find(|(_, g)| *g == name) {
            return Some(h.to_string());
        }
        let rest = name.strip_prefix("blk.")?;
        let (layer, t) = rest.split_once('.')?;
        let (gguf, kind) = t.rsplit_once('.')?;
        let hf = self.layer_pairs().find(|(_, g)| *g == gguf)?.0;
        Some(format!("model.layers.{layer}.{hf}.{kind}"))
    }
}

/// llama.cpp's name for the pre-tokenizer of a model family (convert_hf_to_gguf.py identifies it
/// by hashing a tokenization; here by family and vocabulary size).
pub fn pre_tokenizer(model_type: &str, vocab_size: usize) -> &'static str {
    match model_type {
        "qwen2" | "qwen3" | "qwen3_moe" => "qwen2",
        "olmoe" => "olmo",
        _ if vocab_size >= 128_000 => "llama-bpe",
        _ => "default",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA: Naming = Naming { name: "llama", rotary_order: true, layer: &[PROJECTIONS, PRE_NORMS] };

    #[test]
    fn names_go_both_ways() {
        for hf in ["model.layers.3.self_attn.q_proj.weight", "model.norm.weight", "lm_head.weight"] {
            let g = LLAMA.tensor_to_gguf(hf).unwrap();
            assert_eq!(LLAMA.gguf_to_hf(&g).as_deref(), Some(hf), "{hf} -> {g}");
        }
        assert_eq!(
            LLAMA.tensor_to_gguf("model.layers.0.self_attn.k_norm.weight").as_deref(),
            Some("blk.0.attn_k_norm.weight")
        );
        assert_eq!(LLAMA.tensor_to_gguf("model.layers.2.self_attn.v_proj.bias").as_deref(), Some("blk.2.attn_v.bias"));
        assert_eq!(LLAMA.tensor_to_gguf("model.embed_tokens.weight").as_deref(), Some("token_embd.weight"));
        // The embedding is read by name, not through the layer table.
        assert_eq!(LLAMA.gguf_to_hf("token_embd.weight"), None);
        assert_eq!(LLAMA.tensor_to_gguf("model.layers.0.self_attn.rotary_emb.inv_freq"), None);
        assert_eq!(LLAMA.module_to_gguf("mlp.down_proj"), Some("ffn_down"));
    }
}
