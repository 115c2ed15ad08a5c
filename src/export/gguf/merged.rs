//! A merged model GGUF from a GGUF base: each projection W + s·B·A in the base's own row order (q/k
//! B rows put in llama.cpp's rotary order), every other tensor as the base has it, written tensor
//! by tensor in the chosen type: f32, f16, bf16, q8_0, or q4_k_m mixed as llama.cpp's quantizer mixes
//! it (Q4_K; Q6_K for the output layer and for attn_v and ffn_down in the layers llama.cpp gives
//! more bits; norms f32; Q5_0 / Q8_0 where a row is not a multiple of the 256-value K block). The
//! base's metadata is kept (its tokenizer among it), with `tokenizer.chat_template` set to the
//! template the training shards were rendered with. A quantised base is dequantised, added to and
//! requantised, which the summary counts.

use super::hf_base::HfBase;
use crate::gguf::names::Naming;
use crate::gguf::rotary::to_gguf;
use crate::gguf::writer::{write, TensorSpec};
use crate::train::adapters::lora::{module_of_lora_a, peft_key};
use crate::train::io::gguf::config_of;
use crate::train::model::config::ModelConfig;
use crate::train::model::family::of_model_type;
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelType {
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0")]
    #[serde(rename = "q8_0")]
    Q8_0,
    /// llama.cpp's Q4_K_M mix.
    #[value(name = "q4_k_m")]
    #[serde(rename = "q4_k_m")]
    Q4KM,
}

impl ModelType {
    /// llama.cpp's `general.file_type` (llama_ftype).
    fn file_type(self) -> u32 {
        match self {
            ModelType::F32 => 0,
            ModelType::F16 => 1,
            ModelType::Q8_0 => 7,
            ModelType::Q4KM => 15,
            ModelType::Bf16 => 32,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct MergedExport {
    pub architecture: String,
    pub tensors: usize,
    pub merged_projections: usize,
    /// Tensors by the type written.
    pub types: BTreeMap<String, usize>,
    /// The base's quantised tensors that were dequantised and written in another type.
    pub requantized: usize,
    /// Tensors written in a fall-back type because their rows do not fill the type's blocks.
    pub fallbacks: usize,
    pub chat_template_from_shards: bool,
    pub bytes: u64,
}

/// llama.cpp's rule for the layers that get more bits in the K-quant mixes.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i as isize - (n / 8) as isize) % 3 == 2
}

/// The type of tensor `name` (row length `row`, layer count `layers`) in the mix `ty`, and whether
/// it is a fall-back.
fn target_type(
    name: &str,
    dims: usize,
    row: usize,
    layers: usize,
    has_output: bool,
    ty: ModelType,
) -> (GgmlDType, bool) {
    if dims == 1 {
        return (GgmlDType::F32, false);
    }
    let want = match ty {
        ModelType::F32 => GgmlDType::F32,
        ModelType::F16 => GgmlDType::F16,
        ModelType::Bf16 => GgmlDType::BF16,
        ModelType::Q8_0 => GgmlDType::Q8_0,
        ModelType::Q4KM => {
            let layer = name.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|l| l.parse().ok());
            let output = name == "output.weight" || (!has_output && name == "token_embd.weight");
            match layer {
                _ if output => GgmlDType::Q6K,
                Some(i)
                    if (name.ends_with("attn_v.weight") || name.ends_with("ffn_down.weight"))
                        && use_more_bits(i, layers) =>
                {
                    GgmlDType::Q6K
                }
                _ => GgmlDType::Q4K,
            }
        }
    };
    if row.is_multiple_of(want.block_size()) {
        return (want, false);
    }
    let fallback = match want {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        _ => GgmlDType::F16,
    };
    if row.is_multiple_of(fallback.block_size()) {
        (fallback, true)
    } else {
        (GgmlDType::F16, true)
    }
}

/// llama.cpp's order: the embedding, the layers in order, then the output norm and layer.
fn order_key(name: &str) -> (usize, usize, String) {
    match name.strip_prefix("blk.").and_then(|r| r.split_once('.')) {
        Some((l, rest)) => (1, l.parse().unwrap_or(0), rest.to_string()),
        None if name.starts_with("token_embd") => (0, 0, name.to_string()),
        None => (2, 0, name.to_string()),
    }
}

/// An adapted projection's LoRA: B (rows in the base's order), A and the scale; its delta s·B·A is
/// made only when the tensor is written.
struct Lora {
    b: Tensor,
    a: Tensor,
    scale: f64,
}

impl Lora {
    fn dims(&self) -> [usize; 2] {
        [self.b.dims()[0], self.a.dims()[1]]
    }
    fn delta(&self) -> Result<Tensor> {
        Ok((self.b.matmul(&self.a)? * self.scale)?)
    }
}

/// The LoRA of every adapted projection, by llama.cpp tensor name.
fn deltas(adapter_dir: &Path, c: &ModelConfig, naming: Naming) -> Result<HashMap<String, Lora>> {
    let (s, tensors) = crate::train::io::peft::read(adapter_dir)?;
    if s.use_dora {
        bail!(
            "{}: a DoRA adapter (use_dora) has no llama.cpp form and is not folded into a GGUF base yet; merge it into a Hugging Face \
             directory with `tunekit merge`, then `tunekit export gguf --model MERGED --data SHARDS`",
            adapter_dir.display()
        );
    }
    super::adapter::refuse_unconverted(adapter_dir, &s)?;
    if tensors.contains_key(crate::train::adapters::score::SCORE_WEIGHT) {
        bail!("{}: a reward model's score head cannot be merged into a language model GGUF", adapter_dir.display());
    }
    let scale = if s.rslora { s.alpha / (s.r as f64).sqrt() } else { s.alpha / s.r as f64 };
    let mut out = HashMap::new();
    for (key, a) in &tensors {
        let Some(module) = module_of_lora_a(key) else { continue };
        let b = tensors.get(&peft_key(module, "B")).with_context(|| format!("{key} has no lora_B"))?;
        let hf = format!("{module}.weight");
        let gguf = naming
            .hf_to_gguf(&hf)
            .with_context(|| format!("{}: {key} is not a projection llama.cpp has", adapter_dir.display()))?;
        let b = if naming.rotary_order && hf.ends_with(".q_proj.weight") {
            to_gguf(b, c.num_attention_heads)?
        } else if naming.rotary_order && hf.ends_with(".k_proj.weight") {
            to_gguf(b, c.kv_heads())?
        } else {
            b.clone()
        };
        out.insert(gguf, Lora { b: b.to_dtype(DType::F32)?, a: a.to_dtype(DType::F32)?, scale });
    }
    Ok(out)
}

/// Where the base's tensors come from.
enum Source {
    Gguf(std::fs::File, Content),
    Hf(Box<HfBase>),
}

/// GGUF metadata as it is written: (key, value) pairs.
type Metadata = Vec<(String, Value)>;

/// The base to read tensors from, its shape, and the metadata the merged file starts from: a GGUF
/// base's own (its tokenizer among it), or a Hugging Face directory's shape and `tokenizer` as
/// llama.cpp's converter writes them; `chat_template` (the training shards') replaces the base's.
fn open_base(
    base: &Path,
    chat_template: Option<String>,
    tokenizer: Option<&Path>,
) -> Result<(Source, ModelConfig, Metadata)> {
    let from_shards = chat_template.is_some();
    if base.is_dir() {
        let config = ModelConfig::from_file(&base.join("config.json"))?;
        let family = of_model_type(&config.model_type)?;
        if !matches!(family.gguf.name, "llama" | "qwen2" | "qwen3" | "qwen3moe" | "olmoe" | "gpt-oss") {
            bail!(
                "{}: a {} model directory is not written to GGUF here; convert the base with llama.cpp's \
                 convert_hf_to_gguf.py and merge the adapter into that GGUF (--base BASE.gguf)",
                base.display(),
                family.name
            );
        }
        let a = family.gguf;
        let hf = HfBase::open(base, family)?;
        let tok_path = tokenizer.unwrap_or(base);
        let tok = crate::tokenize::TokenizerInfo::load(tok_path).with_context(|| {
            format!(
                "the GGUF needs the model's tokenizer: {} has none; pass --data SHARDS (their tokenizer)",
                tok_path.display()
            )
        })?;
        let md = hf.metadata(a.name, &tok, chat_template.as_deref())?;
        Ok((Source::Hf(Box::new(hf)), config, md))
    } else if base.extension().is_some_and(|e| e == "gguf") {
        let (file, content) = crate::gguf::metadata::open(base)?;
        let config = config_of(&content, base)?;
        let md: Metadata = content
            .metadata
            .iter()
            .filter(|(k, _)| {
                !matches!(k.as_str(), "general.file_type" | "general.quantization_version" | "general.alignment")
            })
            .filter(|(k, _)| !(from_shards && k.as_str() == "tokenizer.chat_template"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .chain(chat_template.map(|t| ("tokenizer.chat_template".to_string(), Value::String(t))))
            .collect();
        Ok((Source::Gguf(file, content), config, md))
    } else {
        bail!("{}: expected a GGUF file or a Hugging Face model directory", base.display());
    }
}

/// What will be written: each tensor's name, shape and type, in llama.cpp's order.
struct Plan {
    specs: Vec<TensorSpec>,
    types: BTreeMap<String, usize>,
    fallbacks: usize,
    requantized: usize,
}

/// The plan for the base's tensors in `ty`, checked against the adapter's deltas.
fn plan(source: &Source, config: &ModelConfig, deltas: &HashMap<String, Lora>, ty: ModelType) -> Result<Plan> {
    // Name, shape and (for a GGUF base) the type the base holds it in.
    let mut list: Vec<(String, Vec<usize>, Option<GgmlDType>)> = match source {
        Source::Gguf(_, c) => {
            c.tensor_infos.iter().map(|(n, i)| (n.clone(), i.shape.dims().to_vec(), Some(i.ggml_dtype))).collect()
        }
        Source::Hf(h) => h.tensors.iter().map(|(g, _, s)| (g.clone(), s.clone(), None)).collect(),
    };
    list.sort_by_key(|(n, ..)| order_key(n));
    let has_output = list.iter().any(|(n, ..)| n == "output.weight");
    let mut p = Plan { specs: vec![], types: BTreeMap::new(), fallbacks: 0, requantized: 0 };
    for (n, dims, held) in &list {
        if let Some(d) = deltas.get(n) {
            if d.dims() != dims.as_slice() {
                bail!(
                    "the adapter's {n} is {:?}, the base's {:?}: merge into the base it was trained on",
                    d.dims(),
                    dims
                );
            }
        }
        let (dtype, fell_back) =
            target_type(n, dims.len(), *dims.last().unwrap_or(&1), config.num_hidden_layers, has_output, ty);
        p.fallbacks += usize::from(fell_back);
        let quantized_base = held.is_some_and(|h| !matches!(h, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16));
        p.requantized += usize::from(quantized_base && *held != Some(dtype));
        *p.types.entry(format!("{dtype:?}")).or_insert(0) += 1;
        p.specs.push(TensorSpec { name: n.clone(), shape: dims.clone(), dtype });
    }
    let unused: Vec<&String> = deltas.keys().filter(|k| !list.iter().any(|(n, ..)| n == *k)).collect();
    if !unused.is_empty() {
        bail!(
            "the adapter has {} the base lacks (e.g. {}): merge into the base it was trained on",
            unused.len(),
            unused[0]
        );
    }
    Ok(p)
}

/// Writes the base (a GGUF file, or a Hugging Face directory with `tokenizer`) with the adapter (if
/// any) merged, in `ty`, to `out`.
pub fn export(
    adapter_dir: Option<&Path>,
    base: &Path,
    ty: ModelType,
    chat_template: Option<String>,
    tokenizer: Option<&Path>,
    out: &Path,
) -> Result<MergedExport> {
    if let (Some(adapter), true) = (adapter_dir, base.is_dir() && is_moe_dir(base)) {
        return export_moe(adapter, base, ty, chat_template, tokenizer, out);
    }
    let from_shards = chat_template.is_some();
    let (mut source, config, mut metadata) = open_base(base, chat_template, tokenizer)?;
    let naming = of_model_type(&config.model_type)?.gguf;
    let arch = naming.name;
    let mut deltas = match adapter_dir {
        Some(d) => deltas(d, &config, naming)?,
        None => HashMap::new(),
    };
    let merged_projections = deltas.len();
    let Plan { specs, types, fallbacks, requantized } = plan(&source, &config, &deltas, ty)?;
    metadata.retain(|(k, _)| !matches!(k.as_str(), "general.file_type" | "general.quantization_version"));
    metadata.push(("general.file_type".into(), Value::U32(ty.file_type())));
    metadata.push(("general.quantization_version".into(), Value::U32(2)));
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    let bytes = write(out, &metadata, &specs, |i| {
        let name = &specs[i].name;
        let delta = deltas.remove(name);
        let mut w = match &mut source {
            Source::Gguf(file, content) => {
                let q = content.tensor(file, name, &Device::Cpu)?;
                if delta.is_none() && q.dtype() == specs[i].dtype {
                    return Ok(q.data()?.to_vec());
                }
                q.dequantize(&Device::Cpu)?
            }
            Source::Hf(h) => h.load(name)?,
        };
        if let Some(d) = delta {
            w = (w + d.delta()?)?;
        }
        Ok(QTensor::quantize(&w, specs[i].dtype)?.data()?.to_vec())
    })
    .with_context(|| format!("writing {}", out.display()))?;
    Ok(MergedExport {
        architecture: arch.into(),
        tensors: specs.len(),
        merged_projections,
        types,
        requantized,
        fallbacks,
        chat_template_from_shards: from_shards,
        bytes,
    })
}

/// Whether the Hugging Face directory `dir` holds a mixture of experts.
pub fn is_moe_dir(dir: &Path) -> bool {
    ModelConfig::from_file(&dir.join("config.json"))
        .ok()
        .and_then(|c| of_model_type(&c.model_type).ok())
        .is_some_and(|f| f.moe.is_some())
}

/// A mixture of experts' adapter merged: PEFT's stacked expert adapters are folded into each
/// expert by the model itself (as `merge` writes it), into a Hugging Face directory beside `out`,
/// which is then written as the base is.
fn export_moe(
    adapter: &Path,
    base: &Path,
    ty: ModelType,
    chat_template: Option<String>,
    tokenizer: Option<&Path>,
    out: &Path,
) -> Result<MergedExport> {
    let place = crate::train::io::Placement {
        device: crate::train::device::DeviceSpec::Cpu,
        dtype: crate::train::device::Precision::F32,
        ..Default::default()
    };
    let model = crate::train::io::load_model(base, Some(adapter), &place)?;
    let merged_projections = model.adapted_modules().0.len();
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = WorkDir(parent.join(format!(".tunekit-merged-{}", std::process::id())));
    crate::train::io::merge::write_hf(&model, &tmp.0)
        .with_context(|| format!("writing the merged model to {}", tmp.0.display()))?;
    drop(model);
    let e = export(None, &tmp.0, ty, chat_template, Some(tokenizer.unwrap_or(base)), out)?;
    Ok(MergedExport { merged_projections, ..e })
}

/// A working directory removed when dropped (on errors too).
struct WorkDir(std::path::PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// candle's quantisers on Gaussian rows: each type's relative RMS error in the order of its bits.
    #[test]
    fn quantisers_lose_less_with_more_bits() {
        let dev = Device::Cpu;
        let mut rng = crate::split::SplitMix64::new(5);
        let v: Vec<f32> = (0..64 * 512)
            .map(|_| {
                let (u, w) = (
                    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64,
                    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64,
                );
                ((-2.0 * (u + 1e-12).ln()).sqrt() * (std::f64::consts::TAU * w).cos()) as f32
            })
            .collect();
        let x = Tensor::from_vec(v, (64, 512), &dev).unwrap();
        let err = |t: GgmlDType| {
            let q = QTensor::quantize(&x, t).unwrap().dequantize(&dev).unwrap();
            let e = (q - &x).unwrap().sqr().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
            e.sqrt()
        };
        let e: Vec<f32> =
            [GgmlDType::Q4K, GgmlDType::Q5_0, GgmlDType::Q6K, GgmlDType::Q8_0].into_iter().map(err).collect();
        eprintln!("relative RMS error Q4_K {:.4} Q5_0 {:.4} Q6_K {:.4} Q8_0 {:.4}", e[0], e[1], e[2], e[3]);
        assert!(e[0] > e[1] && e[1] > e[2] && e[2] > e[3], "{e:?}");
    }

    #[test]
    fn q4_k_m_mixes_as_llama_cpp_with_fall_backs_for_short_rows() {
        let t = |name: &str, row: usize| target_type(name, 2, row, 32, true, ModelType::Q4KM).0;
        assert_eq!(t("output.weight", 4096), GgmlDType::Q6K);
        assert_eq!(t("blk.0.attn_v.weight", 4096), GgmlDType::Q6K, "the first eighth of layers");
        assert_eq!(t("blk.5.attn_v.weight", 4096), GgmlDType::Q4K);
        assert_eq!(t("blk.6.ffn_down.weight", 4096), GgmlDType::Q6K, "(6 - 4) % 3 == 2");
        assert_eq!(t("blk.6.attn_q.weight", 4096), GgmlDType::Q4K);
        assert_eq!(t("blk.6.attn_q.weight", 576), GgmlDType::Q5_0, "576 is not a multiple of 256");
        assert_eq!(t("output.weight", 576), GgmlDType::Q8_0);
        assert_eq!(target_type("blk.0.attn_norm.weight", 1, 576, 32, true, ModelType::Q4KM).0, GgmlDType::F32);
        // Tied embeddings: token_embd is the output layer.
        assert_eq!(target_type("token_embd.weight", 2, 4096, 32, false, ModelType::Q4KM).0, GgmlDType::Q6K);
    }
}
