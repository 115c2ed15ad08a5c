//! Granite-MoE: Granite's four multipliers with a mixture of experts on every layer: the router
//! takes the top-k logits and a softmax over them (the same as renormalised top-k probabilities).
//! Checkpoints stack the experts: `block_sparse_moe.input_linear` [E, 2I, H] (gate, then up),
//! `output_linear` [E, H, I], the router at `router.layer`.

use super::{granite, Arch, ExpertStorage, Family, Moe, MoeLayout};
use crate::gguf::names::{Naming, GRANITE_ROUTER, PRE_NORMS, PROJECTIONS};
use crate::train::model::config::ModelConfig;
use anyhow::Result;

const EXPERTS: MoeLayout = MoeLayout {
    block: "block_sparse_moe",
    router: "router",
    stored: ExpertStorage::Stacked { router: "router.layer", gate_up: "input_linear", down: "output_linear" },
};

pub const GRANITE_MOE: Family = Family {
    name: "Granite-MoE",
    model_types: &["granitemoe"],
    hf_classes: &["GraniteMoeForCausalLM"],
    gguf: Naming { name: "granitemoe", rotary_order: true, layer: &[PROJECTIONS, PRE_NORMS, GRANITE_ROUTER] },
    moe: Some(&EXPERTS),
    describe,
    ..granite::GRANITE
};

fn describe(c: &ModelConfig) -> Result<Arch> {
    Ok(granite::describe(c)?.sparse(Moe::of(c, Some(true))?))
}
