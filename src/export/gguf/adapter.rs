//! A PEFT LoRA adapter as llama.cpp's LoRA adapter GGUF (what `convert_lora_to_gguf.py` writes
//! and `llama-cli --lora`, Ollama's ADAPTER and LM Studio load): `general.type = adapter`,
//! `adapter.type = lora`, `adapter.lora.alpha`, the base's `general.architecture`, and per adapted
//! projection `blk.N.attn_q.weight.lora_a` (r x in) and `.lora_b` (out x r), named as llama.cpp
//! names the base weight. llama.cpp keeps Llama/Mistral q and k rows in its own rotary order, so
//! their B rows are put in that order; it scales by alpha / r, so an rsLoRA adapter (alpha /
//! sqrt(r)) is written with the alpha that gives the same scale. A mixture's expert adapters go
//! out stacked beside llama.cpp's stacked experts (`blk.N.ffn_gate_exps.weight.lora_a` [E, r, in]).

use crate::gguf::rotary::to_gguf;
use crate::gguf::writer::{write, TensorSpec};
use crate::train::adapters::lora::peft_key;
use crate::train::adapters::score::SCORE_WEIGHT;
use crate::train::io::peft;
use crate::train::model::config::ModelConfig;
use crate::train::model::family::{of_model_type, ExpertStorage};
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};
use serde::Serialize;
use std::path::Path;

/// The tensor type of the exported matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterType {
    F32,
    F16,
    /// 8-bit blocks of 32 along each row; a matrix whose rows are shorter (B, with r under 32)
    /// falls back to f16.
    #[value(name = "q8_0")]
    #[serde(rename = "q8_0")]
    Q8_0,
}

impl AdapterType {
    fn ggml(self) -> GgmlDType {
        match self {
            AdapterType::F32 => GgmlDType::F32,
            AdapterType::F16 => GgmlDType::F16,
            AdapterType::Q8_0 => GgmlDType::Q8_0,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct AdapterExport {
    pub architecture: String,
    pub r: usize,
    /// The alpha written (alpha * sqrt(r) for an rsLoRA adapter: llama.cpp scales by alpha / r).
    pub alpha: f64,
    pub scale: f64,
    pub tensors: usize,
    /// Matrices written as f16 because their rows do not fill q8_0 blocks.
    pub f16_fallbacks: usize,
    pub bytes: u64,
}

/// Inputs and outputs of a projection at the base's shapes.
fn projection_shape(c: &ModelConfig, module: &str) -> Option<(usize, usize)> {
    let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim());
    let (q, kv) = (c.num_attention_heads * hd, c.kv_heads() * hd);
    Some(match module {
        "self_attn.q_proj" => (h, q),
        "self_attn.k_proj" | "self_attn.v_proj" => (h, kv),
        "self_attn.qkv_proj" => (h, q + 2 * kv),
        "self_attn.o_proj" => (q, h),
        "mlp.gate_proj" | "mlp.up_proj" => (h, i),
        "mlp.gate_up_proj" => (h, 2 * i),
        "mlp.down_proj" => (i, h),
        _ => return None,
    })
}

/// Refuses a PiSSA/OLoRA adapter saved unconverted (`init_lora_weights` "pissa"/"olora"): it is a
/// delta against the base's residual, which llama.cpp does not compute.
pub fn refuse_unconverted(adapter_dir: &Path, settings: &crate::train::adapters::lora::LoraSettings) -> Result<()> {
    if settings.init.mutates_base() {
        bail!(
            "{}: this adapter was saved unconverted (init_lora_weights {}): it needs the base turned into its \
             residual, which llama.cpp does not do; merge it with `tunekit merge` (which redoes the \
             decomposition), or save it from PEFT with path_initial_model_for_weight_conversion (tunekit's \
             own runs are saved converted)",
            adapter_dir.display(),
            settings.init.peft_name()
        );
    }
    Ok(())
}

/// Writes the adapter in `adapter_dir` (PEFT) for the base of shape `base` to `out`.
pub fn export(adapter_dir: &Path, base: &ModelConfig, ty: AdapterType, out: &Path) -> Result<AdapterExport> {
    let (settings, tensors) = crate::train::io::peft::read(adapter_dir)?;
    if settings.use_dora {
        bail!(
            "{}: a DoRA adapter (use_dora) has no llama.cpp form; merge it into a Hugging Face \
             directory with `tunekit merge`, then `tunekit export gguf --model MERGED --data SHARDS`",
            adapter_dir.display()
        );
    }
    refuse_unconverted(adapter_dir, &settings)?;
    if tensors.contains_key(SCORE_WEIGHT) {
        bail!(
            "{}: a reward model's score head cannot go into a llama.cpp adapter (llama.cpp runs language models); \
             score with `tunekit score` instead",
            adapter_dir.display()
        );
    }
    if settings.train_router {
        bail!(
            "{}: the adapter trains the routers in full (--train-router, PEFT's modules_to_save), which a llama.cpp \
             LoRA adapter cannot hold; write the merged model instead: `tunekit export gguf --merge`",
            adapter_dir.display()
        );
    }
    let naming = of_model_type(&base.model_type)?.gguf;
    let (arch, rotary_order) = (naming.name, naming.rotary_order);
    let modules: Vec<(&str, &str)> =
        naming.layer.iter().flat_map(|t| t.iter()).filter(|(h, _)| h.ends_with("_proj")).copied().collect();
    let r = settings.r;
    let mut specs = vec![];
    let mut mats: Vec<Tensor> = vec![];
    let mut fallbacks = 0;
    // (llama.cpp's base weight, A, B) of every adapted projection, then of the experts.
    let mut pairs: Vec<(String, Tensor, Tensor)> = vec![];
    for layer in 0..base.num_hidden_layers {
        for &(module, gguf_module) in &modules {
            let key = |ab: &str| peft_key(&format!("model.layers.{layer}.{module}"), ab);
            let (Some(a), Some(b)) = (tensors.get(&key("A")), tensors.get(&key("B"))) else { continue };
            let (inp, outp) = projection_shape(base, module).expect("a known projection");
            if a.dims() != [r, inp] || b.dims() != [outp, r] {
                bail!(
                    "{}: the adapter does not fit the base: {} is {:?} and {} is {:?}, the base's {module} of layer \
                     {layer} takes {inp} inputs to {outp} outputs (r {r}); export against the base the adapter was trained on",
                    adapter_dir.display(),
                    key("A"),
                    a.dims(),
                    key("B"),
                    b.dims()
                );
            }
            let b = match (rotary_order, module) {
                (true, "self_attn.q_proj") => to_gguf(b, base.num_attention_heads)?,
                (true, "self_attn.k_proj") => to_gguf(b, base.kv_heads())?,
                _ => b.clone(),
            };
            pairs.push((format!("blk.{layer}.{gguf_module}.weight"), a.clone(), b));
        }
    }
    let alpha = if settings.rslora { settings.alpha * (r as f64).sqrt() } else { settings.alpha };
    if tensors.keys().any(|k| crate::train::model::moe::is_expert_adapter(k)) {
        pairs.extend(expert_matrices(adapter_dir, base, &settings, &tensors, alpha)?);
    }
    for (weight, a, b) in pairs {
        for (suffix, m) in [("lora_a", a), ("lora_b", b)] {
            let mut dtype = ty.ggml();
            if !m.dims()[m.rank() - 1].is_multiple_of(dtype.block_size()) {
                dtype = GgmlDType::F16;
                fallbacks += 1;
            }
            specs.push(TensorSpec { name: format!("{weight}.{suffix}"), shape: m.dims().to_vec(), dtype });
            mats.push(m);
        }
    }
    let highest = tensors.keys().filter_map(|k| layer_of(k)).max();
    if let Some(l) = highest.filter(|&l| l >= base.num_hidden_layers) {
        bail!(
            "{}: the adapter has layer {l}, the base only {} layers; export against the base it was trained on",
            adapter_dir.display(),
            base.num_hidden_layers
        );
    }
    if specs.is_empty() {
        bail!("{}: no LoRA matrices of the base's projections in the adapter", adapter_dir.display());
    }
    let metadata = vec![
        ("general.architecture".to_string(), Value::String(arch.into())),
        ("general.type".to_string(), Value::String("adapter".into())),
        ("general.name".to_string(), Value::String(name_of(adapter_dir))),
        ("adapter.type".to_string(), Value::String("lora".into())),
        ("adapter.lora.alpha".to_string(), Value::F32(alpha as f32)),
    ];
    let bytes = write(out, &metadata, &specs, |i| {
        let q = QTensor::quantize(&mats[i].to_dtype(DType::F32)?, specs[i].dtype)?;
        Ok(q.data()?.to_vec())
    })
    .with_context(|| format!("writing {}", out.display()))?;
    Ok(AdapterExport {
        architecture: arch.into(),
        r,
        alpha,
        scale: alpha / r as f64,
        tensors: specs.len(),
        f16_fallbacks: fallbacks,
        bytes,
    })
}

/// The experts' adapters as llama.cpp applies them to its stacked experts (`build_lora_mm_id`):
/// per sparse layer and `ffn_{gate,up,down}_exps`, A stacked [E, r, in] and B [E, out, r] (the
/// fused gate_up's B split into gate's rows and up's). llama.cpp scales every pair by the file's
/// alpha over the pair's rank, so B carries the ratio to the pair's own scale (PEFT doubles the
/// rank and alpha of gate_up).
fn expert_matrices(
    adapter_dir: &Path,
    base: &ModelConfig,
    settings: &crate::train::adapters::lora::LoraSettings,
    tensors: &std::collections::HashMap<String, Tensor>,
    alpha: f64,
) -> Result<Vec<(String, Tensor, Tensor)>> {
    let family = of_model_type(&base.model_type)?;
    let arch = crate::train::model::family::describe(base)?;
    let (Some(layout), Some(moe)) = (family.moe, arch.moe.as_ref()) else {
        bail!("{}: the adapter adapts experts, but the base ({}) has none", adapter_dir.display(), base.model_type);
    };
    let interleaved = match layout.stored {
        ExpertStorage::PerExpert { .. } => false,
        ExpertStorage::Interleaved => true,
        ExpertStorage::Stacked { .. } => bail!(
            "{}: a {} is not written to GGUF here, so neither is its experts' adapter",
            adapter_dir.display(),
            family.name
        ),
    };
    let mut out = vec![];
    for (layer, _) in arch.layers.iter().enumerate().filter(|(_, l)| l.sparse) {
        let block = format!("model.layers.{layer}.{}", layout.block);
        for peft::ExpertAdapter { param: k, per_expert, scale } in
            peft::expert_adapters(settings, tensors, &block, moe.experts)?
        {
            let rank = per_expert[0].0.dim(0)?;
            let ratio = scale * rank as f64 / alpha;
            let a = Tensor::stack(&per_expert.iter().map(|(a, _)| a.clone()).collect::<Vec<_>>(), 0)?;
            let b = (Tensor::stack(&per_expert.iter().map(|(_, b)| b.clone()).collect::<Vec<_>>(), 0)? * ratio)?;
            let (rows, ins) = (b.dim(1)?, a.dim(2)?);
            let weight = |part: &str| format!("blk.{layer}.ffn_{part}_exps.weight");
            let expected_in = if k == 0 { base.hidden_size } else { moe.intermediate };
            if ins != expected_in {
                bail!(
                    "{}: layer {layer}'s expert adapter takes {ins} inputs, the base's experts {expected_in}; export \
                     against the base the adapter was trained on",
                    adapter_dir.display()
                );
            }
            match k {
                0 => {
                    // gate's rows then up's, or alternating (gpt-oss).
                    let half = rows / 2;
                    let rows_of = |h: usize| -> Result<Tensor> {
                        Ok(match interleaved {
                            true => {
                                let picked = Tensor::arange_step(h as u32, rows as u32, 2, b.device())?;
                                b.index_select(&picked, 1)?
                            }
                            false => b.narrow(1, h * half, half)?.contiguous()?,
                        })
                    };
                    out.push((weight("gate"), a.clone(), rows_of(0)?));
                    out.push((weight("up"), a, rows_of(1)?));
                }
                _ => out.push((weight("down"), a, b)),
            }
        }
    }
    Ok(out)
}

fn layer_of(key: &str) -> Option<usize> {
    key.split(".layers.").nth(1)?.split('.').next()?.parse().ok()
}

fn name_of(dir: &Path) -> String {
    std::fs::canonicalize(dir)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
        .unwrap_or_else(|| "adapter".into())
}
