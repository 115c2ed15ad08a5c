//! Gemma 2: Gemma 3's sandwich norms, GeGLU and scaled embeddings without q/k norms, attention scores
//! and final logits soft-capped (`c * tanh(x / c)`: 50 and 30), sliding-window and global layers
//! alternating, one rotary embedding.

use super::gemma3::{gemma_base, gemma_gguf_keys, SANDWICH_NORMS};
use super::{layer_types, Arch, Family, Header, LayerPlan};
use crate::gguf::metadata::{f64_of, usize_of};
use crate::gguf::names::{Naming, PROJECTIONS};
use crate::train::model::config::ModelConfig;
use anyhow::Result;

pub const GEMMA2: Family = Family {
    name: "Gemma 2",
    model_types: &["gemma2"],
    hf_classes: &["Gemma2ForCausalLM"],
    gguf: Naming { name: "gemma2", rotary_order: false, layer: &[PROJECTIONS, SANDWICH_NORMS] },
    describe,
    from_gguf,
    ..super::gemma3::GEMMA3
};

fn describe(c: &ModelConfig) -> Result<Arch> {
    let window = c.usize_key("sliding_window");
    let sliding = layer_types(c, |i| !(i + 1).is_multiple_of(2))?;
    let layers = sliding
        .into_iter()
        .map(|s| LayerPlan { window: if s { window } else { None }, rotary: Some(0), sparse: false })
        .collect();
    Ok(Arch { layers, ..gemma_base(c)? })
}

/// llama.cpp's gemma2 keys: the window (4096 unless written), the two soft-caps.
fn from_gguf(header: &Header, c: &mut ModelConfig) -> Result<()> {
    let md = &header.metadata;
    gemma_gguf_keys(c);
    let extra = &mut c.extra;
    let window = usize_of(md, "gemma2.attention.sliding_window").unwrap_or(4096);
    extra.insert("sliding_window".into(), serde_json::json!(window));
    for (gguf, hf) in [
        ("gemma2.attn_logit_softcapping", "attn_logit_softcapping"),
        ("gemma2.final_logit_softcapping", "final_logit_softcapping"),
    ] {
        if let Some(v) = f64_of(md, gguf) {
            extra.insert(hf.into(), serde_json::json!(v));
        }
    }
    Ok(())
}
