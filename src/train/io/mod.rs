//! Weights in and out of the trainer: base models from Hugging Face directories ([`hf`]) and GGUF
//! files ([`gguf`]), adapters in PEFT's format ([`peft`]) and merged models ([`merge`]); training
//! checkpoints are the loop's (`train::trainer::checkpoints`). [`load_model`] is the one way a
//! command gets a model to run.

pub mod gguf;
pub mod hf;
pub mod merge;
pub mod model_dir;
pub mod peft;

pub use crate::train::device::Qlora;
use crate::train::device::{DeviceSpec, Precision};
use crate::train::model::base::BaseModel;
use crate::train::model::Model;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::path::Path;

/// Loads a base; with `qlora` the projections are quantised (or kept quantised) one tensor at a
/// time as they are read, so the whole base is never in f32.
pub fn load_base(path: &Path, device: &Device, qlora: Option<Qlora>) -> Result<BaseModel> {
    if qlora == Some(Qlora::Gguf) && path.extension().is_none_or(|e| e != "gguf") {
        bail!("--qlora gguf needs a .gguf base model; use --qlora nf4 for a safetensors base");
    }
    if path.is_dir() {
        hf::load_hf_dir(path, device, qlora == Some(Qlora::Nf4))
    } else if path.extension().is_some_and(|e| e == "gguf") {
        gguf::load_gguf(path, device, qlora)
    } else if path.exists() {
        bail!(
            "{}: expected a Hugging Face model directory (config.json + *.safetensors) or a .gguf file",
            path.display()
        )
    } else {
        bail!("model {} does not exist", path.display())
    }
}

/// The shape of the base at `path` (a Hugging Face directory's config.json or a GGUF header),
/// without loading its weights.
pub fn read_config(path: &Path) -> Result<crate::train::model::config::ModelConfig> {
    if path.is_dir() {
        let file = path.join("config.json");
        let config = crate::train::model::config::ModelConfig::from_file(&file)?;
        crate::train::model::family::describe(&config).with_context(|| file.display().to_string())?;
        Ok(config)
    } else if path.extension().is_some_and(|e| e == "gguf") {
        gguf::read_config(path)
    } else {
        bail!(
            "{}: expected a Hugging Face model directory (config.json + *.safetensors) or a .gguf file",
            path.display()
        )
    }
}

/// How to hold and run a base model.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    pub device: DeviceSpec,
    pub dtype: Precision,
    /// The projections in 4 bits, or full precision.
    pub qlora: Option<Qlora>,
    /// `--qlora-embeddings`: the embedding and lm_head in NF4 too.
    pub qlora_embeddings: bool,
}

/// The model on its device, base read (and quantised) on the CPU first, optionally with a PEFT
/// adapter from `adapter`. The heap the load's temporaries used is handed back afterwards.
pub fn load_model(path: &Path, adapter: Option<&Path>, place: &Placement) -> Result<Model> {
    let (device, dtype) = crate::train::device::select(place.device, place.dtype)?;
    crate::cluster::world().attach(&device)?;
    let mut base = load_base(path, &Device::Cpu, place.qlora)?;
    if place.qlora_embeddings {
        if place.qlora.is_none() {
            bail!("--qlora-embeddings quantises the embedding along with a 4-bit base: add --qlora nf4 or gguf");
        }
        base.quantize_embeddings()?;
    }
    let mut model = Model::from_base_as(&base, &device, dtype)?;
    if place.qlora.is_some() {
        crate::allocator::favour_memory();
        if !place.qlora_embeddings {
            model.hold_embeddings_in_bf16()?;
        }
    }
    if let Some(score) = base.tensors.get("score.weight") {
        // A reward model written as a sequence classifier (`train --method reward --full`).
        let score = score.to_device(&device)?.to_dtype(candle_core::DType::F32)?;
        model.score = Some(candle_core::Var::from_tensor(&score)?);
    }
    drop(base);
    crate::allocator::release_freed_memory();
    if let Some(a) = adapter {
        peft::load_into(&mut model, a)?;
    }
    Ok(model)
}
