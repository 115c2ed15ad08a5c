//! Qwen3-MoE: Qwen3's attention (a norm over each q and k head) with a mixture of experts in place
//! of the MLP on every `decoder_sparse_step`-th layer not listed in `mlp_only_layers` (those keep a
//! dense SwiGLU MLP of `intermediate_size`); top-k weights renormalised as `norm_topk_prob` says.

use super::{llama, Arch, ExpertStorage, Family, Moe, MoeLayout, QkNorm};
use crate::gguf::names::{Naming, MLP_ROUTER, PRE_NORMS, PROJECTIONS};
use crate::train::model::config::ModelConfig;
use anyhow::{bail, Result};

/// The experts and router of Qwen3-MoE and OLMoE (stored one module per expert).
pub const MLP_EXPERTS: MoeLayout = MoeLayout {
    block: "mlp",
    router: "gate",
    stored: ExpertStorage::PerExpert {
        block: "mlp",
        router: "gate",
        gate: "gate_proj",
        up: "up_proj",
        down: "down_proj",
    },
};

pub const QWEN3_MOE: Family = Family {
    name: "Qwen3-MoE",
    model_types: &["qwen3_moe"],
    hf_classes: &["Qwen3MoeForCausalLM"],
    gguf: Naming { name: "qwen3moe", rotary_order: false, layer: &[PROJECTIONS, PRE_NORMS, MLP_ROUTER] },
    moe: Some(&MLP_EXPERTS),
    describe,
    ..llama::QWEN3
};

fn describe(c: &ModelConfig) -> Result<Arch> {
    let mut a = Arch { qk_norm: QkNorm::PerHead, ..llama::plain(c)? }.sparse(Moe::of(c, None)?);
    let step = c.usize_key("decoder_sparse_step").unwrap_or(1);
    if step == 0 {
        bail!("decoder_sparse_step must be at least 1");
    }
    let dense: Vec<usize> = match c.extra.get("mlp_only_layers").and_then(|v| v.as_array()) {
        Some(list) => list.iter().filter_map(|v| v.as_u64()).map(|v| v as usize).collect(),
        None => vec![],
    };
    for (i, l) in a.layers.iter_mut().enumerate() {
        l.sparse = !dense.contains(&i) && (i + 1) % step == 0;
    }
    Ok(a)
}
