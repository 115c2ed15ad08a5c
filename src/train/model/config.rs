//! The model's shape, read from a Hugging Face `config.json` or from GGUF metadata (llama.cpp
//! names): the keys every family shares as fields, the rest kept as they came ([`ModelConfig::extra`])
//! for the family's own file to read (`super::family`).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RopeScaling {
    #[serde(default, alias = "type", skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    /// LongRoPE (Phi-3): per-frequency divisors within and beyond the original context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub short_factor: Option<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub long_factor: Option<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_factor: Option<f64>,
    /// YaRN: the rotations bounding the ramp between extrapolated and interpolated frequencies, the
    /// attention factor's log multipliers, and whether the ramp's bounds are rounded out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_fast: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_slow: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mscale: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mscale_all_dim: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate: Option<bool>,
}

/// The rope scalings the decoder computes (Phi-3's LongRoPE in its family file).
pub const ROPE_TYPES: [&str; 6] = ["default", "linear", "llama3", "yarn", "longrope", "su"];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelConfig {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// transformers v5 writes `rope_parameters` {rope_theta, rope_type, factor, ...} instead of
    /// `rope_theta` + `rope_scaling`; `from_file` folds it into those two. Where it holds one set per
    /// layer type (Gemma 3: "full_attention", "sliding_attention") it stays, for the family to read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// q/k/v biases (Qwen2); also `attention_bias` in Llama configs.
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    /// Every other key of config.json, as written (a family's own: sliding windows, multipliers...).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_model_type() -> String {
    "llama".into()
}
fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    4096
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut c: ModelConfig =
            serde_json::from_str(&text).with_context(|| format!("{}: not a model config.json", path.display()))?;
        let per_layer_type = c.rope_parameters.as_ref().is_some_and(|rp| rp.get("rope_theta").is_none());
        if let Some(mut rp) = c.rope_parameters.take_if(|_| !per_layer_type) {
            if let Some(set) = rp.as_object_mut().filter(|s| s.contains_key("rope_type")) {
                set.remove("type"); // v5 keeps the old name beside the new (Phi-3)
            }
            if let Some(theta) = rp.get("rope_theta").and_then(|v| v.as_f64()) {
                c.rope_theta = theta;
            }
            let kind = rp.get("rope_type").and_then(|v| v.as_str()).unwrap_or("default");
            if kind != "default" {
                c.rope_scaling = Some(
                    serde_json::from_value(rp.clone())
                        .with_context(|| format!("{}: bad rope_parameters", path.display()))?,
                );
            }
        }
        c.check()?;
        Ok(c)
    }
    /// The shapes consistent (the family's own keys are checked by `family::describe`).
    pub fn check(&self) -> Result<()> {
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            bail!("num_attention_heads must be a multiple of num_key_value_heads");
        }
        if let Some(t) = self.rope_scaling.as_ref().and_then(|s| s.rope_type.as_deref()) {
            if !ROPE_TYPES.contains(&t) {
                bail!("rope_scaling type '{t}' is not supported ({})", ROPE_TYPES.join(", "));
            }
        }
        Ok(())
    }
    /// A family key of config.json as a number.
    pub fn f64_key(&self, key: &str) -> Option<f64> {
        self.extra.get(key).and_then(|v| v.as_f64())
    }
    /// A family key of config.json as a count.
    pub fn usize_key(&self, key: &str) -> Option<usize> {
        self.extra.get(key).and_then(|v| v.as_u64()).map(|v| v as usize)
    }
    /// A family key of config.json as text.
    pub fn str_key(&self, key: &str) -> Option<&str> {
        self.extra.get(key).and_then(|v| v.as_str())
    }
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    /// Inverse frequencies of the rotary embedding over the whole head, with Llama-3 or linear
    /// scaling when configured.
    pub fn inv_freq(&self) -> Vec<f64> {
        inv_freq(self.head_dim(), self.rope_theta, self.rope_scaling.as_ref())
    }
}

/// YaRN (transformers' `_compute_yarn_parameters`): inverse frequencies over `dims` at base `theta`
/// blended from the extrapolated (high frequencies) to the interpolated (divided by `factor`, low
/// frequencies) across a linear ramp between the dimensions of `beta_fast` and `beta_slow`
/// rotations over the original context, and the factor that scales cos and sin
/// (`0.1 ln(factor) + 1`, or its mscale ratio, or the config's `attention_factor`).
pub fn yarn(dims: usize, theta: f64, s: &RopeScaling, max_position_embeddings: usize) -> (Vec<f64>, f64) {
    let original = s.original_max_position_embeddings.unwrap_or(max_position_embeddings) as f64;
    let factor = s.factor.unwrap_or(max_position_embeddings as f64 / original);
    let get_mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
    let attention = s.attention_factor.unwrap_or(match (s.mscale, s.mscale_all_dim) {
        (Some(m), Some(a)) if m != 0.0 && a != 0.0 => get_mscale(factor, m) / get_mscale(factor, a),
        _ => get_mscale(factor, 1.0),
    });
    let (fast, slow) =
        (s.beta_fast.filter(|b| *b != 0.0).unwrap_or(32.0), s.beta_slow.filter(|b| *b != 0.0).unwrap_or(1.0));
    let d = dims as f64;
    let correction =
        |rotations: f64| d * (original / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln());
    let (mut low, mut high) = (correction(fast), correction(slow));
    if s.truncate.unwrap_or(true) {
        (low, high) = (low.floor(), high.ceil());
    }
    let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
    if low == high {
        high += 0.001;
    }
    let inv = (0..dims / 2)
        .map(|i| {
            let pos = theta.powf(2.0 * i as f64 / d);
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            let extrapolation = 1.0 - ramp;
            (1.0 / (factor * pos)) * (1.0 - extrapolation) + (1.0 / pos) * extrapolation
        })
        .collect();
    (inv, attention)
}

/// Inverse frequencies of a rotary embedding over `dims` dimensions at base `theta`, with Llama-3 or
/// linear scaling when `scaling` says so.
pub fn inv_freq(dims: usize, theta: f64, scaling: Option<&RopeScaling>) -> Vec<f64> {
    let base: Vec<f64> = (0..dims / 2).map(|i| 1.0 / theta.powf(2.0 * i as f64 / dims as f64)).collect();
    match scaling {
        Some(s) if s.rope_type.as_deref() == Some("llama3") => {
            let factor = s.factor.unwrap_or(8.0);
            let low = s.low_freq_factor.unwrap_or(1.0);
            let high = s.high_freq_factor.unwrap_or(4.0);
            let old = s.original_max_position_embeddings.unwrap_or(8192) as f64;
            let (low_wl, high_wl) = (old / low, old / high);
            base.into_iter()
                .map(|f| {
                    let wl = 2.0 * std::f64::consts::PI / f;
                    if wl < high_wl {
                        f
                    } else if wl > low_wl {
                        f / factor
                    } else {
                        let smooth = (old / wl - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
        Some(s) if s.rope_type.as_deref() == Some("linear") => {
            base.into_iter().map(|f| f / s.factor.unwrap_or(1.0)).collect()
        }
        _ => base,
    }
}
