//! Granite 3: the Llama decoder with four multipliers: on the embeddings, on each block's output
//! before the residual add, on the attention scores (in place of 1/sqrt(head_dim)) and on the logits
//! (divided by `logits_scaling`).

use super::{llama, Arch, Family, Header};
use crate::gguf::metadata::f64_of;
use crate::gguf::names::{Naming, PRE_NORMS, PROJECTIONS};
use crate::train::model::config::ModelConfig;
use anyhow::Result;

pub const GRANITE: Family = Family {
    name: "Granite",
    model_types: &["granite"],
    hf_classes: &["GraniteForCausalLM"],
    gguf: Naming { name: "granite", rotary_order: true, layer: &[PROJECTIONS, PRE_NORMS] },
    describe,
    from_gguf,
    ..llama::LLAMA
};

pub fn describe(c: &ModelConfig) -> Result<Arch> {
    let a = llama::plain(c)?;
    Ok(Arch {
        embed_scale: c.f64_key("embedding_multiplier").unwrap_or(1.0),
        residual_scale: c.f64_key("residual_multiplier").unwrap_or(1.0),
        attn_scale: c.f64_key("attention_multiplier").unwrap_or(a.attn_scale),
        logit_scale: 1.0 / c.f64_key("logits_scaling").unwrap_or(1.0),
        ..a
    })
}

/// llama.cpp's granite keys back to config.json's.
fn from_gguf(header: &Header, c: &mut ModelConfig) -> Result<()> {
    let md = &header.metadata;
    for (gguf, hf) in [
        ("granite.embedding_scale", "embedding_multiplier"),
        ("granite.residual_scale", "residual_multiplier"),
        ("granite.attention.scale", "attention_multiplier"),
        ("granite.logit_scale", "logits_scaling"),
    ] {
        if let Some(v) = f64_of(md, gguf) {
            c.extra.insert(hf.into(), serde_json::json!(v));
        }
    }
    Ok(())
}
