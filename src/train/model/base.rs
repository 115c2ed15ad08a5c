//! The frozen base as loaded, before it becomes a [`super::Model`]: the config and every tensor by
//! Hugging Face name, full precision, except the projections a QLoRA load quantised as it read them
//! (NF4) or kept as a GGUF file stores them. The loaders that fill it live in `train::io`.

use super::config::ModelConfig;
use super::quant::Nf4Weight;
use anyhow::{Context, Result};
use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

pub struct BaseModel {
    pub config: ModelConfig,
    /// Full-precision tensors by Hugging Face name (quantised projections are absent).
    pub tensors: HashMap<String, Tensor>,
    /// QLoRA: projections quantised to NF4 as they were read, by module path.
    pub nf4: HashMap<String, Arc<Nf4Weight>>,
    /// QLoRA on a GGUF base: the file's own quantised projections, by module path.
    pub quantized: HashMap<String, Arc<QTensor>>,
    /// Loaded for QLoRA: projections read later (a mixture's fused experts) are held quantised too.
    pub qlora: bool,
    pub source: PathBuf,
    /// Tokenizer and chat template from GGUF metadata, when the base is a GGUF file.
    pub gguf_metadata: Option<HashMap<String, gguf_file::Value>>,
}

impl BaseModel {
    /// QLoRA with `--qlora-embeddings`: the token embedding and an untied lm_head go to NF4 too
    /// (by default they stay full precision, as the QLoRA paper and PEFT leave them).
    pub fn quantize_embeddings(&mut self) -> Result<()> {
        for name in ["model.embed_tokens", "lm_head"] {
            if let Some(t) = self.tensors.remove(&format!("{name}.weight")) {
                self.nf4.insert(name.to_string(), nf4_of(&t)?);
            }
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .with_context(|| format!("{}: the weights have no tensor '{name}'", self.source.display()))
    }
}

/// Whether a Hugging Face tensor name is one of the seven projections LoRA adapts.
pub fn is_projection(name: &str) -> bool {
    let proj = (name.contains(".self_attn.") || name.contains(".mlp.")) && name.ends_with("_proj.weight");
    // Mixtral's experts: w1 (gate), w3 (up), w2 (down).
    let mixtral = name.contains(".block_sparse_moe.experts.")
        && [".w1.weight", ".w2.weight", ".w3.weight"].iter().any(|w| name.ends_with(w));
    proj || mixtral
}

/// A weight matrix quantised to NF4.
pub fn nf4_of(t: &Tensor) -> Result<Arc<Nf4Weight>> {
    let (r, c) = t.dims2()?;
    let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(Arc::new(Nf4Weight::quantize(&data, r, c)))
}
