//! SmolLM3: the Llama decoder with no rotary embedding in every fourth layer (NoPE), as its
//! `no_rope_layers` list says (1: rotary, 0: none) or, from a GGUF file, as llama.cpp fixes it.

use super::{llama, no_gguf_keys, Arch, Family, LayerPlan};
use crate::gguf::names::{Naming, PRE_NORMS, PROJECTIONS};
use crate::train::model::config::ModelConfig;
use anyhow::{bail, Result};

pub const SMOLLM3: Family = Family {
    name: "SmolLM3",
    model_types: &["smollm3"],
    hf_classes: &["SmolLM3ForCausalLM"],
    gguf: Naming { name: "smollm3", rotary_order: true, layer: &[PROJECTIONS, PRE_NORMS] },
    describe,
    from_gguf: no_gguf_keys,
    ..llama::LLAMA
};

fn describe(c: &ModelConfig) -> Result<Arch> {
    let mut a = llama::plain(c)?;
    let interval = c.usize_key("no_rope_layer_interval").unwrap_or(4).max(1);
    let rope: Vec<bool> = match c.extra.get("no_rope_layers").and_then(|v| v.as_array()) {
        Some(list) if list.len() == c.num_hidden_layers => list.iter().map(|v| v.as_u64() != Some(0)).collect(),
        Some(list) => bail!("no_rope_layers has {} entries for {} layers", list.len(), c.num_hidden_layers),
        None => (0..c.num_hidden_layers).map(|i| (i + 1) % interval != 0).collect(),
    };
    if c.extra.get("use_sliding_window").and_then(|v| v.as_bool()) == Some(true) {
        bail!("SmolLM3 with use_sliding_window is not supported");
    }
    a.layers = rope.into_iter().map(|r| LayerPlan { window: None, rotary: r.then_some(0), sparse: false }).collect();
    Ok(a)
}
