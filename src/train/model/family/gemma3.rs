//! Gemma 3 (text): RMSNorm scaling by (1 + w), embeddings scaled by sqrt(hidden), four norms per
//! layer (before and after attention, before and after the MLP), q/k norms per head, GeGLU with
//! tanh-GELU, scores scaled by `query_pre_attn_scalar`^-1/2, local layers (a sliding window, their
//! own rotary base) five to one global layer (its base, with the config's scaling), tied embeddings.

use super::{activation, layer_types, rotary_of_set, Activation, Arch, Family, Header, LayerPlan, QkNorm};
use crate::gguf::metadata::{f64_of, usize_of};
use crate::gguf::names::{Naming, PROJECTIONS};
use crate::train::model::config::ModelConfig;
use anyhow::{bail, Result};

/// The sandwich norms of Gemma 2 and 3, by Hugging Face and llama.cpp names.
pub const SANDWICH_NORMS: &[(&str, &str)] = &[
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "post_attention_norm"),
    ("pre_feedforward_layernorm", "ffn_norm"),
    ("post_feedforward_layernorm", "post_ffw_norm"),
];

pub const GEMMA3: Family = Family {
    name: "Gemma 3",
    model_types: &["gemma3_text"],
    hf_classes: &["Gemma3ForCausalLM"],
    gguf: Naming { name: "gemma3", rotary_order: false, layer: &[PROJECTIONS, SANDWICH_NORMS] },
    norms: [
        Some("input_layernorm"),
        Some("post_attention_layernorm"),
        Some("pre_feedforward_layernorm"),
        Some("post_feedforward_layernorm"),
    ],
    norm_offset: 1.0,
    fused: false,
    moe: None,
    describe,
    from_gguf,
};

/// What Gemma 2 and 3 share: GeGLU, scaled embeddings, the query scalar, soft-caps where set.
pub fn gemma_base(c: &ModelConfig) -> Result<Arch> {
    if c.extra.get("use_bidirectional_attention").and_then(|v| v.as_bool()) == Some(true) {
        bail!("use_bidirectional_attention (an embedding model) is not a causal language model");
    }
    let scalar = c.f64_key("query_pre_attn_scalar").unwrap_or(c.head_dim() as f64);
    Ok(Arch {
        activation: activation(c, Activation::GeluTanh)?,
        embed_scale: (c.hidden_size as f64).sqrt(),
        attn_scale: scalar.powf(-0.5),
        attn_softcap: c.f64_key("attn_logit_softcapping"),
        final_softcap: c.f64_key("final_logit_softcapping"),
        ..Arch::plain(c)
    })
}

fn describe(c: &ModelConfig) -> Result<Arch> {
    let pattern = c.usize_key("sliding_window_pattern").or(c.usize_key("_sliding_window_pattern")).unwrap_or(6);
    let sliding = layer_types(c, |i| !(i + 1).is_multiple_of(pattern.max(1)))?;
    let window = c.usize_key("sliding_window");
    let per_type = |t: &str| c.rope_parameters.as_ref().and_then(|p| p.get(t));
    // The global layers' rotary: v5's per-layer-type set, or v4's rope_theta + rope_scaling.
    let global = match per_type("full_attention") {
        Some(set) => rotary_of_set(c, Some(set), c.rope_theta)?,
        None => super::Rotary::of(c),
    };
    let local_theta = c.f64_key("rope_local_base_freq").unwrap_or(10_000.0);
    let local = rotary_of_set(c, per_type("sliding_attention"), local_theta)?;
    let layers = sliding
        .into_iter()
        .map(|s| match s {
            true if window.is_some() => LayerPlan { window, rotary: Some(1), sparse: false },
            true => LayerPlan { window: None, rotary: Some(1), sparse: false },
            false => LayerPlan { window: None, rotary: Some(0), sparse: false },
        })
        .collect();
    Ok(Arch { qk_norm: QkNorm::PerHead, rotaries: vec![global, local], layers, ..gemma_base(c)? })
}

/// What Gemma 2 and 3 GGUFs leave to the architecture: GeGLU with tanh-GELU, and the query scalar as
/// the head width (llama.cpp's rule for all but the 27B).
pub fn gemma_gguf_keys(c: &mut ModelConfig) {
    c.hidden_act = None;
    c.extra.insert("hidden_activation".into(), "gelu_pytorch_tanh".into());
    c.extra.insert("query_pre_attn_scalar".into(), serde_json::json!(c.head_dim.unwrap_or(256)));
}

/// llama.cpp's gemma3 keys: the window and, where written, the local rotary base (10000 otherwise);
/// the query scalar is the head width (llama.cpp's rule for all but the 27B).
fn from_gguf(header: &Header, c: &mut ModelConfig) -> Result<()> {
    let md = &header.metadata;
    gemma_gguf_keys(c);
    let extra = &mut c.extra;
    if let Ok(w) = usize_of(md, "gemma3.attention.sliding_window") {
        extra.insert("sliding_window".into(), serde_json::json!(w));
    }
    let local = f64_of(md, "gemma3.rope.freq_base_swa").unwrap_or(10_000.0);
    extra.insert("rope_local_base_freq".into(), serde_json::json!(local));
    if let Some(cap) = f64_of(md, "gemma3.final_logit_softcapping") {
        extra.insert("final_logit_softcapping".into(), serde_json::json!(cap));
    }
    Ok(())
}
