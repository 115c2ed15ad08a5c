//! Mixtral: Mistral's decoder (a sliding window where the config sets one) with a mixture of
//! experts on every layer, the top-k weights always renormalised. Checkpoints keep the experts as
//! `block_sparse_moe.experts.{e}.w1` (gate), `w3` (up) and `w2` (down); transformers (and PEFT's
//! names) call the block `mlp`.

use super::{llama, Arch, ExpertStorage, Family, Moe, MoeLayout};
use crate::gguf::names::{Naming, BLOCK_SPARSE_ROUTER, PRE_NORMS, PROJECTIONS};
use crate::train::model::config::ModelConfig;
use anyhow::Result;

const EXPERTS: MoeLayout = MoeLayout {
    block: "mlp",
    router: "gate",
    stored: ExpertStorage::PerExpert { block: "block_sparse_moe", router: "gate", gate: "w1", up: "w3", down: "w2" },
};

pub const MIXTRAL: Family = Family {
    name: "Mixtral",
    model_types: &["mixtral"],
    hf_classes: &["MixtralForCausalLM"],
    gguf: Naming { name: "llama", rotary_order: true, layer: &[PROJECTIONS, PRE_NORMS, BLOCK_SPARSE_ROUTER] },
    moe: Some(&EXPERTS),
    describe,
    ..llama::LLAMA
};

fn describe(c: &ModelConfig) -> Result<Arch> {
    let mut a = llama::plain(c)?.sparse(Moe::of(c, Some(true))?);
    let window = c.usize_key("sliding_window");
    a.layers.iter_mut().for_each(|l| l.window = window);
    Ok(a)
}
