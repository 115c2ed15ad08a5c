//! Llama and its close relatives, the plain decoder every other family varies: RMSNorm before
//! attention and before the SwiGLU MLP, rotary embeddings (Llama-3 or linear scaling), grouped-query
//! attention. Mistral adds a sliding window on every layer where its config sets one; Qwen2 adds
//! q/k/v biases, Qwen3 a norm over each q and k head, both sliding windows on the layers
//! `layer_types` says when `use_sliding_window` is on.

use super::{activation, layer_types, no_gguf_keys, Activation, Arch, Family, QkNorm};
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
    moe: None,
    describe: plain,
    from_gguf: no_gguf_keys,
};

pub const QWEN2: Family = Family {
    name: "Qwen2",
    model_types: &["qwen2"],
    hf_classes: &["Qwen2ForCausalLM"],
    gguf: Naming { name: "qwen2", rotary_order: false, layer: &[PROJECTIONS, PRE_NORMS] },
    describe: |c| Ok(Arch { qkv_bias: true, ..qwen_windows(c, plain(c)?)? }),
    ..LLAMA
};

pub const QWEN3: Family = Family {
    name: "Qwen3",
    model_types: &["qwen3"],
    hf_classes: &["Qwen3ForCausalLM"],
    gguf: Naming { name: "qwen3", rotary_order: false, layer: &[PROJECTIONS, PRE_NORMS] },
    describe: |c| Ok(Arch { qk_norm: QkNorm::PerHead, ..qwen_windows(c, plain(c)?)? }),
    ..LLAMA
};

/// The plain decoder of `config`; SwiGLU only. Mistral's (and Phi-3's) `sliding_window`, where set,
/// holds on every layer.
pub fn plain(config: &ModelConfig) -> Result<Arch> {
    if activation(config, Activation::Silu)? != Activation::Silu {
        bail!("this family's MLP is SwiGLU: hidden_act must be silu");
    }
    let mut a = Arch::plain(config);
    if matches!(config.model_type.as_str(), "mistral" | "phi3") {
        let window = config.usize_key("sliding_window");
        a.layers.iter_mut().for_each(|l| l.window = window);
    }
    Ok(a)
}

/// Qwen's sliding windows: on the layers `layer_types` marks (from `max_window_layers` on by
/// default), only when `use_sliding_window` is on.
fn qwen_windows(c: &ModelConfig, mut a: Arch) -> Result<Arch> {
    if c.extra.get("use_sliding_window").and_then(|v| v.as_bool()) != Some(true) {
        return Ok(a);
    }
    let from = c.usize_key("max_window_layers").unwrap_or(c.num_hidden_layers);
    let window = c.usize_key("sliding_window");
    for (l, sliding) in a.layers.iter_mut().zip(layer_types(c, |i| i >= from)?) {
        l.window = if sliding { window } else { None };
    }
    Ok(a)
}
