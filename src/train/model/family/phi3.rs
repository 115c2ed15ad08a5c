//! Phi-3, Phi-3.5 and Phi-4-mini: q, k and v in one projection (`qkv_proj`) and gate and up in one
//! (`gate_up_proj`), adapted by LoRA as PEFT names them; rotary over the first
//! `partial_rotary_factor` of each head; LongRoPE (per-frequency divisors, short within the original
//! context and long beyond it, cos and sin scaled by the attention factor); a sliding window on every
//! layer where the config sets one (Phi-3-mini-4k: 2047).

use super::{llama, Arch, Family, Header, Rotary};
use crate::gguf::metadata::usize_of;
use crate::gguf::names::Naming;
use crate::train::model::config::ModelConfig;
use anyhow::{bail, Result};

const LAYER: &[(&str, &str)] = &[
    ("self_attn.qkv_proj", "attn_qkv"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
];

pub const PHI3: Family = Family {
    name: "Phi-3",
    model_types: &["phi3"],
    hf_classes: &["Phi3ForCausalLM"],
    gguf: Naming { name: "phi3", rotary_order: false, layer: &[LAYER] },
    fused: true,
    moe: None,
    describe,
    from_gguf,
    ..llama::LLAMA
};

fn describe(c: &ModelConfig) -> Result<Arch> {
    let a = llama::plain(c)?;
    let factor = c.f64_key("partial_rotary_factor").unwrap_or(1.0);
    let dims = (c.head_dim() as f64 * factor) as usize;
    let shape = |f: &[f64]| -> Vec<f64> {
        (0..dims / 2).map(|i| 1.0 / (f[i] * c.rope_theta.powf(2.0 * i as f64 / dims as f64))).collect()
    };
    let rotary = match &c.rope_scaling {
        Some(s) if matches!(s.rope_type.as_deref(), Some("longrope" | "su")) => {
            let (Some(short), Some(long)) = (&s.short_factor, &s.long_factor) else {
                bail!("LongRoPE needs short_factor and long_factor");
            };
            if short.len() != dims / 2 || long.len() != dims / 2 {
                bail!("LongRoPE factors have {} and {} entries for {} frequencies", short.len(), long.len(), dims / 2);
            }
            let original = s
                .original_max_position_embeddings
                .or(c.usize_key("original_max_position_embeddings"))
                .unwrap_or(c.max_position_embeddings);
            let ratio = c.max_position_embeddings as f64 / original as f64;
            let scale = s.attention_factor.unwrap_or(if ratio <= 1.0 {
                1.0
            } else {
                (1.0 + ratio.ln() / (original as f64).ln()).sqrt()
            });
            Rotary { inv_freq: shape(short), scale, long: Some((original, shape(long))) }
        }
        Some(s) if s.rope_type.as_deref().is_some_and(|t| t != "default") => {
            bail!("Phi-3 rope_type '{}' is not supported (default, longrope)", s.rope_type.as_deref().unwrap_or(""))
        }
        _ => Rotary { inv_freq: shape(&vec![1.0; dims / 2]), scale: 1.0, long: None },
    };
    Ok(Arch { rotaries: vec![rotary], ..a })
}

/// llama.cpp's phi3 keys: the rotary width (partial rotary) and the window (0: none); LongRoPE's
/// factors are tensors there (`rope_factors_long`), which are not read: such a file is refused.
fn from_gguf(header: &Header, c: &mut ModelConfig) -> Result<()> {
    let md = &header.metadata;
    if header.tensor_infos.contains_key("rope_factors_long.weight") {
        bail!("a Phi-3 GGUF with LongRoPE (its factors are tensors) is not read here; train from the Hugging Face directory");
    }
    if let Ok(dims) = usize_of(md, "phi3.rope.dimension_count") {
        c.extra.insert("partial_rotary_factor".into(), serde_json::json!(dims as f64 / c.head_dim() as f64));
    }
    if let Some(w) = usize_of(md, "phi3.attention.sliding_window").ok().filter(|&w| w > 0) {
        c.extra.insert("sliding_window".into(), serde_json::json!(w));
    }
    Ok(())
}
