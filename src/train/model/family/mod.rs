//! Model families. The shared pieces (attention, MLP, norms, rotary, LoRA linears, CPU kernels) live
//! in `train::model`; a family file says how one architecture puts them together and how its weights
//! are named, as mlx-lm's `models/` and llama.cpp's `src/models/` keep one short file per
//! architecture. A [`Family`] is that file's description (its Hugging Face `model_type`s, class and
//! tensor names, llama.cpp's architecture and names); [`Arch`] is what one model of it asks of the
//! decoder, read from its config by the family's `describe`.
//!
//! Adding a family: a new file with its `Family` constant, listed in [`FAMILIES`], and its case in
//! tests/families.rs.

pub mod gemma2;
pub mod gemma3;
pub mod gpt_oss;
pub mod granite;
pub mod granitemoe;
pub mod llama;
pub mod mixtral;
pub mod olmo2;
pub mod olmoe;
pub mod phi3;
pub mod qwen3_moe;
pub mod smollm3;

use super::config::{inv_freq, ModelConfig};
use crate::gguf::names::Naming;
use anyhow::{bail, Context, Result};

/// One model family.
pub struct Family {
    /// Its name in lists and errors ("Gemma 3").
    pub name: &'static str,
    /// Hugging Face `model_type`s it reads.
    pub model_types: &'static [&'static str],
    /// transformers' class of each model type, written into a merged model's config.json.
    pub hf_classes: &'static [&'static str],
    /// llama.cpp's architecture and tensor names.
    pub gguf: Naming,
    /// The layer's norms by Hugging Face module path: before attention, after it, before the MLP,
    /// after it (absent where the family has none).
    pub norms: [Option<&'static str>; 4],
    /// What the norms' weights are added to (Gemma scales by 1 + w, stored as w).
    pub norm_offset: f64,
    /// Projections fused as Phi-3 fuses them: `qkv_proj` and `gate_up_proj`.
    pub fused: bool,
    /// Where a mixture-of-experts family keeps its experts and router (none: dense).
    pub moe: Option<&'static MoeLayout>,
    /// This model's [`Arch`] from its config (checking the family's keys).
    pub describe: fn(&ModelConfig) -> Result<Arch>,
    /// The family's keys from a GGUF header (llama.cpp's `{arch}.` keys already read into the
    /// config's shared fields); the header's tensor index too, where a family keeps settings there.
    pub from_gguf: fn(&Header, &mut ModelConfig) -> Result<()>,
}

/// Every family tunekit trains, in the order they are listed to users.
pub const FAMILIES: [&Family; 14] = [
    &llama::LLAMA,
    &llama::QWEN2,
    &llama::QWEN3,
    &gemma3::GEMMA3,
    &gemma2::GEMMA2,
    &phi3::PHI3,
    &smollm3::SMOLLM3,
    &olmo2::OLMO2,
    &granite::GRANITE,
    &qwen3_moe::QWEN3_MOE,
    &mixtral::MIXTRAL,
    &olmoe::OLMOE,
    &granitemoe::GRANITE_MOE,
    &gpt_oss::GPT_OSS,
];

/// The model types every family reads, for an error's list.
fn supported_model_types() -> String {
    FAMILIES.iter().flat_map(|f| f.model_types.iter().copied()).collect::<Vec<_>>().join(", ")
}

/// The family of a Hugging Face `model_type`.
pub fn of_model_type(model_type: &str) -> Result<&'static Family> {
    match FAMILIES.iter().find(|f| f.model_types.contains(&model_type)) {
        Some(f) => Ok(f),
        None => bail!("model_type '{model_type}' is not supported; tunekit trains {}", supported_model_types()),
    }
}

/// How a model's family puts its decoder together, read from its config (the family known, its
/// keys consistent).
pub fn describe(config: &ModelConfig) -> Result<Arch> {
    let family = of_model_type(&config.model_type)?;
    (family.describe)(config).with_context(|| format!("model_type '{}'", config.model_type))
}

/// The family of a GGUF file's `general.architecture`.
pub fn of_gguf(arch: &str) -> Result<&'static Family> {
    match FAMILIES.iter().find(|f| f.gguf.name == arch) {
        Some(f) => Ok(f),
        None => {
            let names: Vec<&str> = FAMILIES.iter().map(|f| f.gguf.name).collect();
            bail!("GGUF architecture '{arch}' is not supported; tunekit trains {}", names.join(", "))
        }
    }
}

/// The family of a GGUF architecture whose file has experts (`{arch}.expert_count` > 0) or not:
/// llama.cpp's `llama` is Llama, or Mixtral with experts.
pub fn of_gguf_experts(arch: &str, experts: bool) -> Result<&'static Family> {
    match FAMILIES.iter().find(|f| f.gguf.name == arch && f.moe.is_some() == experts) {
        Some(f) => Ok(f),
        None => of_gguf(arch),
    }
}

/// The activation of the gated MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU: `silu(gate) * up`.
    Silu,
    /// GeGLU with the tanh approximation of GELU (`gelu_pytorch_tanh`).
    GeluTanh,
}

/// Where the q/k norms go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// Over each head (Qwen3, Gemma 3).
    PerHead,
    /// Over the whole projection, before it is split into heads (OLMo 2).
    Whole,
}

/// One rotary embedding: inverse frequencies over the first `2 * inv_freq.len()` dimensions of a
/// head (fewer than all with partial rotary), cos and sin scaled by `scale`; `long` replaces them
/// when a sequence reaches past `.0` positions (LongRoPE).
#[derive(Debug, Clone, PartialEq)]
pub struct Rotary {
    pub inv_freq: Vec<f64>,
    pub scale: f64,
    pub long: Option<(usize, Vec<f64>)>,
}

impl Rotary {
    /// The plain rotary embedding of `config` over whole heads (its theta and Llama-3 or linear
    /// scaling).
    pub fn of(config: &ModelConfig) -> Rotary {
        Rotary::with(config.head_dim(), config.rope_theta, config.rope_scaling.as_ref(), config.max_position_embeddings)
    }

    /// Over whole heads of `dims` at base `theta`, with `scaling` when given (YaRN's frequencies
    /// and cos/sin factor from the original context out of `max_position_embeddings`).
    pub fn with(
        dims: usize,
        theta: f64,
        scaling: Option<&super::config::RopeScaling>,
        max_position_embeddings: usize,
    ) -> Rotary {
        match scaling.filter(|s| s.rope_type.as_deref() == Some("yarn")) {
            Some(s) => {
                let (inv_freq, scale) = super::config::yarn(dims, theta, s, max_position_embeddings);
                Rotary { inv_freq, scale, long: None }
            }
            None => Rotary { inv_freq: inv_freq(dims, theta, scaling), scale: 1.0, long: None },
        }
    }
}

/// How one layer attends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerPlan {
    /// Local attention: each query sees this many keys (itself included).
    pub window: Option<usize>,
    /// Which of [`Arch::rotaries`] it uses; none: no position embedding (NoPE).
    pub rotary: Option<usize>,
    /// Its MLP is the mixture of experts of [`Arch::moe`] (a dense MLP otherwise).
    pub sparse: bool,
}

/// How a mixture-of-experts family lays out its sparse block: transformers' module names (the
/// block, its router; the experts are `{block}.experts`, whose 3-D `gate_up_proj` [E, 2I, H] and
/// `down_proj` [E, H, I] PEFT adapts by `target_parameters`) and how checkpoints on the Hub store
/// them ([`ExpertStorage`]).
#[derive(Debug)]
pub struct MoeLayout {
    /// The block within a layer: `mlp` (Qwen3-MoE, Mixtral, OLMoE) or `block_sparse_moe` (Granite).
    pub block: &'static str,
    /// The router within the block: `gate` or `router`.
    pub router: &'static str,
    pub stored: ExpertStorage,
}

/// How a checkpoint stores a layer's experts (besides transformers' own fused 3-D names, which are
/// read too).
#[derive(Debug)]
pub enum ExpertStorage {
    /// A module per expert, `{block}.experts.{e}.{gate,up,down}.weight`, and the router at
    /// `{block}.{router}.weight` (`block` as stored: Mixtral's `block_sparse_moe`).
    PerExpert { block: &'static str, router: &'static str, gate: &'static str, up: &'static str, down: &'static str },
    /// Stacked [E, 2I, H] and [E, H, I] tensors (Granite's `input_linear`, `output_linear`).
    Stacked { router: &'static str, gate_up: &'static str, down: &'static str },
    /// gpt-oss: transformers' transposed `experts.gate_up_proj` [E, H, 2I] with the gate and up
    /// columns interleaved (gate at even columns), `experts.down_proj` [E, I, H], a bias beside
    /// each (`gate_up_proj_bias` [E, 2I], `down_proj_bias` [E, H]) and the router's; the hub's
    /// checkpoints hold the two weights in MXFP4 (`_blocks` and `_scales`, [E, out, in] order).
    Interleaved,
}

/// A model's mixture of experts, from its config.
#[derive(Debug, Clone, PartialEq)]
pub struct Moe {
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Each expert's hidden width.
    pub intermediate: usize,
    /// The top-k routing weights divided by their sum (Mixtral, Granite; Qwen3-MoE and OLMoE as
    /// `norm_topk_prob` says), or the softmax's own.
    pub renormalise: bool,
    /// The auxiliary load-balancing loss's coefficient in training: `router_aux_loss_coef` where
    /// the config trains with it (`output_router_logits`), else 0 (as transformers does).
    pub aux_coef: f64,
    /// gpt-oss's clamped SwiGLU in the experts instead of the family's activation:
    /// `(clamp(up, ±limit) + 1) * g * sigmoid(alpha * g)` with `g = min(gate, limit)`.
    pub clamp: Option<ClampedSwiglu>,
}

/// gpt-oss's expert activation: its sigmoid gain and clamp limit (`swiglu_alpha`, `swiglu_limit`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClampedSwiglu {
    pub alpha: f64,
    pub limit: f64,
}

impl Moe {
    /// The mixture of `config` by its keys: the expert count (`num_experts` or
    /// `num_local_experts`), `num_experts_per_tok`, the experts' width (`moe_intermediate_size`,
    /// else `intermediate_size`); `renormalise` where the family always does, else `norm_topk_prob`.
    pub fn of(config: &ModelConfig, renormalise: Option<bool>) -> Result<Moe> {
        let experts = config
            .usize_key("num_experts")
            .or_else(|| config.usize_key("num_local_experts"))
            .context("an MoE config needs num_experts (or num_local_experts)")?;
        let top_k = config.usize_key("num_experts_per_tok").context("an MoE config needs num_experts_per_tok")?;
        if top_k == 0 || top_k > experts {
            bail!("num_experts_per_tok is {top_k} for {experts} experts");
        }
        let trains_aux = config.extra.get("output_router_logits").and_then(|v| v.as_bool()) == Some(true);
        Ok(Moe {
            experts,
            top_k,
            intermediate: config.usize_key("moe_intermediate_size").unwrap_or(config.intermediate_size),
            renormalise: renormalise
                .unwrap_or_else(|| config.extra.get("norm_topk_prob").and_then(|v| v.as_bool()).unwrap_or(false)),
            aux_coef: if trains_aux { config.f64_key("router_aux_loss_coef").unwrap_or(0.001) } else { 0.0 },
            clamp: None,
        })
    }
}

/// What a model asks of the decoder, beyond the shapes of its config.
#[derive(Debug, Clone, PartialEq)]
pub struct Arch {
    pub qk_norm: QkNorm,
    pub qkv_bias: bool,
    pub activation: Activation,
    /// Embeddings are multiplied by this (Gemma: sqrt(hidden); Granite: its multiplier).
    pub embed_scale: f64,
    /// Each block's output is multiplied by this before the residual add (Granite).
    pub residual_scale: f64,
    /// Attention scores are multiplied by this (1/sqrt(head_dim) unless the family says).
    pub attn_scale: f64,
    /// Attention scores soft-capped: `c * tanh(s / c)` (Gemma 2).
    pub attn_softcap: Option<f64>,
    /// A learned logit per query head in every softmax's denominator (gpt-oss's attention sinks,
    /// `self_attn.sinks`): a query may attend to nothing.
    pub attn_sinks: bool,
    /// Logits soft-capped the same way (Gemma 2).
    pub final_softcap: Option<f64>,
    /// Logits are multiplied by this (Granite: 1 / logits_scaling).
    pub logit_scale: f64,
    pub rotaries: Vec<Rotary>,
    pub layers: Vec<LayerPlan>,
    /// The mixture of experts of the layers marked sparse.
    pub moe: Option<Moe>,
}

impl Arch {
    /// This architecture with `moe` in every layer (a family that mixes dense layers in marks them
    /// after).
    pub fn sparse(mut self, moe: Moe) -> Arch {
        self.layers.iter_mut().for_each(|l| l.sparse = true);
        self.moe = Some(moe);
        self
    }

    /// A Llama-like model: SwiGLU, scores scaled by 1/sqrt(head_dim), one rotary embedding in every
    /// layer, no multipliers.
    pub fn plain(config: &ModelConfig) -> Arch {
        Arch {
            qk_norm: QkNorm::None,
            qkv_bias: config.attention_bias.unwrap_or(false),
            activation: Activation::Silu,
            embed_scale: 1.0,
            residual_scale: 1.0,
            attn_scale: 1.0 / (config.head_dim() as f64).sqrt(),
            attn_softcap: None,
            attn_sinks: false,
            final_softcap: None,
            logit_scale: 1.0,
            rotaries: vec![Rotary::of(config)],
            layers: vec![LayerPlan { window: None, rotary: Some(0), sparse: false }; config.num_hidden_layers],
            moe: None,
        }
    }
}

/// `hidden_act` (or Gemma's `hidden_activation`) as an [`Activation`]; `default` when absent.
pub fn activation(config: &ModelConfig, default: Activation) -> Result<Activation> {
    let named = config.hidden_act.as_deref().or_else(|| config.str_key("hidden_activation"));
    match named {
        None => Ok(default),
        Some("silu" | "swish") => Ok(Activation::Silu),
        Some("gelu_pytorch_tanh" | "gelu_tanh" | "gelu_new") => Ok(Activation::GeluTanh),
        Some(other) => bail!("activation '{other}' is not supported (silu, gelu_pytorch_tanh)"),
    }
}

/// `layer_types` ("sliding_attention" / "full_attention") of a config, or `default(i)` per layer
/// where it has none; checked against the layer count.
pub fn layer_types(config: &ModelConfig, default: impl Fn(usize) -> bool) -> Result<Vec<bool>> {
    let n = config.num_hidden_layers;
    let Some(list) = config.extra.get("layer_types").and_then(|v| v.as_array()) else {
        return Ok((0..n).map(default).collect());
    };
    if list.len() != n {
        bail!("layer_types has {} entries for {n} layers", list.len());
    }
    list.iter()
        .map(|v| match v.as_str() {
            Some("sliding_attention") => Ok(true),
            Some("full_attention") => Ok(false),
            other => bail!("layer_types: '{}' is not sliding_attention or full_attention", other.unwrap_or("?")),
        })
        .collect()
}

/// The rotary embedding over whole heads of one `rope_parameters` set ({rope_theta, rope_type,
/// factor...}), `theta` where the set has none.
pub fn rotary_of_set(config: &ModelConfig, set: Option<&serde_json::Value>, theta: f64) -> Result<Rotary> {
    let max_pos = config.max_position_embeddings;
    let Some(set) = set else { return Ok(Rotary::with(config.head_dim(), theta, None, max_pos)) };
    let theta = set.get("rope_theta").and_then(|v| v.as_f64()).unwrap_or(theta);
    let scaling: super::config::RopeScaling = serde_json::from_value(set.clone())?;
    match scaling.rope_type.as_deref() {
        None | Some("default") => Ok(Rotary::with(config.head_dim(), theta, None, max_pos)),
        Some("linear" | "llama3" | "yarn") => Ok(Rotary::with(config.head_dim(), theta, Some(&scaling), max_pos)),
        Some(other) => bail!("rope_type '{other}' is not supported here (default, linear, llama3, yarn)"),
    }
}

/// A GGUF file's header: its metadata and tensor index.
pub type Header = candle_core::quantized::gguf_file::Content;

/// A family with no keys of its own in a GGUF header.
pub fn no_gguf_keys(_: &Header, _: &mut ModelConfig) -> Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_found_by_its_names_and_unknown_ones_list_them() {
        for f in FAMILIES {
            for t in f.model_types {
                assert_eq!(of_model_type(t).unwrap().name, f.name);
            }
            assert_eq!(of_gguf(f.gguf.name).unwrap().gguf.name, f.gguf.name);
        }
        let e = of_model_type("mamba").err().unwrap().to_string();
        assert!(e.contains("'mamba' is not supported") && e.contains("gemma3_text") && e.contains("phi3"), "{e}");
        let e = of_gguf("rwkv7").err().unwrap().to_string();
        assert!(e.contains("gemma3") && e.contains("olmo2"), "{e}");
    }
}
