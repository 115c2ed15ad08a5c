//! OLMo 2: norms after attention and after the MLP instead of before (the residual adds the normed
//! output), and q/k norms over the whole projection before it is split into heads.

use super::{llama, no_gguf_keys, Arch, Family, QkNorm};
use crate::gguf::names::{Naming, PROJECTIONS};
use anyhow::Result;

const POST_NORMS: &[(&str, &str)] =
    &[("post_attention_layernorm", "post_attention_norm"), ("post_feedforward_layernorm", "post_ffw_norm")];

pub const OLMO2: Family = Family {
    name: "OLMo 2",
    model_types: &["olmo2"],
    hf_classes: &["Olmo2ForCausalLM"],
    gguf: Naming { name: "olmo2", rotary_order: false, layer: &[PROJECTIONS, POST_NORMS] },
    norms: [None, Some("post_attention_layernorm"), None, Some("post_feedforward_layernorm")],
    norm_offset: 0.0,
    fused: false,
    moe: None,
    describe: |c| -> Result<Arch> { Ok(Arch { qk_norm: QkNorm::Whole, ..llama::plain(c)? }) },
    from_gguf: no_gguf_keys,
};
