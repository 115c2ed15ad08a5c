//! Llama and its close relatives, the plain decoder every other family varies: RMSNorm before
//! attention and before the SwiGLU MLP, rotary embeddings (Llama-3 or linear scaling), grouped-query
//! attention. Mistral is the same; Qwen2 adds q/k/v biases; Qwen3 adds a norm over each q and k head.

use super::{activation, no_gguf_keys, Activation, Arch, Family, QkNorm};
use crate::gguf::names::{Naming, PRE_NORMS, PROJECTIONS};
use crate::train::model::config::ModelConfig;
use anyhow::{bail, Result};

const NORMS: [Option<&str>; 4] = [Some("input_layernorm"), None, Some("post_attention_layernorm"), None];

pub const LLAMA: Family = Family {
    name: "Llama",
    model_types: &["llama", "mistral"],
    hf_classes: &["LlamaForCausalLM", "MistralForCausalLM"],
    gguf: Naming { name: "llama", rotary_order: true, layer: &[PROJECTIONS, PRE_NORMS] },
    norms: NORMS,
    norm_offset: 0.0,
    fused: false,
    describe: plain,
    from_gguf: no_gguf_keys,
};

pub const QWEN2: Family = Family {
    name: "Qwen2",
    model_types: &["qwen2"],
    hf_classes: &["Qwen2ForCausalLM"],
    gguf: Naming { name: "qwen2", rotary_order: false, layer: &[PROJECTIONS, PRE_NORMS] },
    describe: |c| Ok(Arch { qkv_bias: true, ..plain(c)? }),
    ..LLAMA
};

pub const QWEN3: Family = Family {
    name: "Qwen3",
    model_types: &["qwen3"],
    hf_classes: &["Qwen3ForCausalLM"],
    gguf: Naming { name: "qwen3", rotary_order: false, layer: &[PROJECTIONS, PRE_NORMS] },
    describe: |c| Ok(Arch { qk_norm: QkNorm::PerHead, ..plain(c)? }),
    ..LLAMA
};

/// The plain decoder of `config`; SwiGLU only.
pub fn plain(config: &ModelConfig) -> Result<Arch> {
    if activation(config, Activation::Silu)? != Activation::Silu {
        bail!("this family's MLP is SwiGLU: hidden_act must be silu");
    }
    Ok(Arch::plain(config))
}
