//! OLMoE: the Llama decoder (norms before attention and MLP) with q/k norms over the whole
//! projection, as OLMo 2, and a mixture of experts on every layer; top-k weights renormalised as
//! `norm_topk_prob` says (off in the released models). `clip_qkv` is refused.

use super::{llama, qwen3_moe::MLP_EXPERTS, Arch, Family, Moe, QkNorm};
use crate::gguf::names::{Naming, MLP_ROUTER, PRE_NORMS, PROJECTIONS};
use crate::train::model::config::ModelConfig;
use anyhow::{bail, Result};

pub const OLMOE: Family = Family {
    name: "OLMoE",
    model_types: &["olmoe"],
    hf_classes: &["OlmoeForCausalLM"],
    gguf: Naming { name: "olmoe", rotary_order: false, layer: &[PROJECTIONS, PRE_NORMS, MLP_ROUTER] },
    moe: Some(&MLP_EXPERTS),
    describe,
    ..llama::LLAMA
};

fn describe(c: &ModelConfig) -> Result<Arch> {
    if c.f64_key("clip_qkv").is_some() {
        bail!("clip_qkv (clamping q, k and v) is not supported; the released OLMoE models leave it null");
    }
    Ok(Arch { qk_norm: QkNorm::Whole, ..llama::plain(c)? }.sparse(Moe::of(c, None)?))
}
