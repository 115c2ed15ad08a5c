//! gpt-oss: a mixture of experts on every layer with attention sinks (a learned logit per head in
//! each softmax's denominator), q/k/v/o biases, sliding-window attention on alternate layers (the
//! even ones unless `layer_types` says), YaRN rotary embeddings, a router with a bias whose softmax
//! runs over the top-k logits (the same as renormalised top-k probabilities), and experts with
//! biases and a clamped SwiGLU ([`ClampedSwiglu`]). transformers keeps the experts transposed with
//! gate and up interleaved ([`ExpertStorage::Interleaved`]); the hub's checkpoints hold them in
//! MXFP4.

use super::{layer_types, llama, Arch, ClampedSwiglu, ExpertStorage, Family, Moe, MoeLayout};
use crate::gguf::names::{Naming, GPT_OSS_LAYER, GPT_OSS_NORMS, PROJECTIONS};
use crate::train::model::config::ModelConfig;
use anyhow::Result;

const EXPERTS: MoeLayout = MoeLayout { block: "mlp", router: "router", stored: ExpertStorage::Interleaved };

pub const GPT_OSS: Family = Family {
    name: "gpt-oss",
    model_types: &["gpt_oss"],
    hf_classes: &["GptOssForCausalLM"],
    gguf: Naming { name: "gpt-oss", rotary_order: false, layer: &[PROJECTIONS, GPT_OSS_NORMS, GPT_OSS_LAYER] },
    moe: Some(&EXPERTS),
    describe,
    ..llama::LLAMA
};

fn describe(c: &ModelConfig) -> Result<Arch> {
    let moe = Moe {
        clamp: Some(ClampedSwiglu {
            alpha: c.f64_key("swiglu_alpha").unwrap_or(1.702),
            limit: c.f64_key("swiglu_limit").unwrap_or(7.0),
        }),
        ..Moe::of(c, Some(true))?
    };
    let mut a = Arch { qkv_bias: c.attention_bias.unwrap_or(true), attn_sinks: true, ..Arch::plain(c) }.sparse(moe);
    let window = c.usize_key("sliding_window");
    for (l, sliding) in a.layers.iter_mut().zip(layer_types(c, |i| i % 2 == 0)?) {
        l.window = if sliding { window } else { None };
    }
    Ok(a)
}
