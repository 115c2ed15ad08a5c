//! A Hugging Face model directory as a GGUF source, as llama.cpp's convert_hf_to_gguf.py reads it:
//! tensors under llama.cpp's names (Llama/Mistral q and k rows in its rotary order, Llama-3 rope
//! scaling as a `rope_freqs` tensor), the model's shape as `{arch}.*` keys, and the tokenizer as
//! `tokenizer.ggml.*` (a byte-level BPE vocabulary: tokens padded to the embedding's rows, token
//! types, merges, special ids, the pre-tokenizer by model family). Tensors are read one at a time
//! from the memory-mapped safetensors.

use crate::gguf::names::{pre_tokenizer, Naming};
use crate::gguf::rotary::to_gguf;
use crate::tokenize::TokenizerInfo;
use crate::train::model::config::ModelConfig;
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use std::path::Path;

pub struct HfBase {
    st: MmapedSafetensors,
    pub config: ModelConfig,
    /// llama.cpp name, Hugging Face name ("" for a derived tensor), shape.
    pub tensors: Vec<(String, String, Vec<usize>)>,
    rotary: bool,
}

impl HfBase {
    pub fn open(dir: &Path, naming: Naming) -> Result<HfBase> {
        let rotary = naming.rotary_order;
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let files = crate::train::io::hf::safetensors_files(dir)?;
        let st = unsafe { MmapedSafetensors::multi(&files) }
            .with_context(|| format!("cannot read the safetensors of {}", dir.display()))?;
        let mut tensors = vec![];
        for (name, view) in st.tensors() {
            match naming.tensor_to_gguf(&name) {
                Some(g) => tensors.push((g, name.clone(), view.shape().to_vec())),
                None if name.contains("rotary_emb") => {}
                None => bail!("{}: tensor {name} has no llama.cpp name", dir.display()),
            }
        }
        if config.rope_scaling.as_ref().is_some_and(|s| s.rope_type.as_deref() == Some("llama3")) {
            tensors.push(("rope_freqs.weight".into(), String::new(), vec![config.head_dim() / 2]));
        }
        Ok(HfBase { st, config, tensors, rotary })
    }

    /// Tensor `gguf` in f32, rows in llama.cpp's order.
    pub fn load(&self, gguf: &str) -> Result<Tensor> {
        let (_, hf, _) = self.tensors.iter().find(|(g, ..)| g == gguf).context("unknown tensor")?;
        if hf.is_empty() {
            // Llama 3's rope scaling: the factor dividing each base frequency.
            let c = &self.config;
            let d = c.head_dim();
            let base: Vec<f64> = (0..d / 2).map(|i| 1.0 / c.rope_theta.powf(2.0 * i as f64 / d as f64)).collect();
            let factors: Vec<f32> = base.iter().zip(c.inv_freq()).map(|(b, s)| (b / s) as f32).collect();
            return Ok(Tensor::from_vec(factors, d / 2, &Device::Cpu)?);
        }
        let t = self.st.load(hf, &Device::Cpu)?.to_dtype(DType::F32)?;
        let heads = match gguf {
            g if g.ends_with("attn_q.weight") => Some(self.config.num_attention_heads),
            g if g.ends_with("attn_k.weight") => Some(self.config.kv_heads()),
            _ => None,
        };
        match heads.filter(|_| self.rotary) {
            Some(h) => to_gguf(&t, h),
            None => Ok(t),
        }
    }

    /// The model's shape and its tokenizer as GGUF metadata.
    pub fn metadata(
        &self,
        arch: &str,
        tok: &TokenizerInfo,
        chat_template: Option<&str>,
    ) -> Result<Vec<(String, Value)>> {
        let c = &self.config;
        let u = |v: usize| Value::U32(v as u32);
        let mut md = vec![
            ("general.architecture".to_string(), Value::String(arch.into())),
            ("general.name".to_string(), Value::String("tunekit merged model".into())),
            (format!("{arch}.context_length"), u(c.max_position_embeddings)),
            (format!("{arch}.embedding_length"), u(c.hidden_size)),
            (format!("{arch}.block_count"), u(c.num_hidden_layers)),
            (format!("{arch}.feed_forward_length"), u(c.intermediate_size)),
            (format!("{arch}.attention.head_count"), u(c.num_attention_heads)),
            (format!("{arch}.attention.head_count_kv"), u(c.kv_heads())),
            (format!("{arch}.attention.key_length"), u(c.head_dim())),
            (format!("{arch}.attention.value_length"), u(c.head_dim())),
            (format!("{arch}.rope.dimension_count"), u(c.head_dim())),
            (format!("{arch}.rope.freq_base"), Value::F32(c.rope_theta as f32)),
            (format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(c.rms_norm_eps as f32)),
        ];
        md.extend(tokenizer_metadata(tok, c, chat_template)?);
        Ok(md)
    }
}

/// A byte-level BPE tokenizer as `tokenizer.ggml.*`.
fn tokenizer_metadata(
    tok: &TokenizerInfo,
    c: &ModelConfig,
    chat_template: Option<&str>,
) -> Result<Vec<(String, Value)>> {
    let json: serde_json::Value =
        serde_json::from_str(&tok.tokenizer.to_string(false).map_err(|e| anyhow::anyhow!("{e}"))?)?;
    if json["model"]["type"] != "BPE" || json["model"]["byte_fallback"].as_bool().unwrap_or(false) {
        bail!(
            "{}: only byte-level BPE tokenizers (GPT-2 style: Llama 3, Qwen, SmolLM) are written into a GGUF here; \
             convert this model with llama.cpp's convert_hf_to_gguf.py and merge into that GGUF",
            tok.path.display()
        );
    }
    let vocab = json["model"]["vocab"].as_object().context("tokenizer.json has no model.vocab")?;
    let added: Vec<(usize, String, bool)> = json["added_tokens"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| {
                    Some((t["id"].as_u64()? as usize, t["content"].as_str()?.to_string(), t["special"].as_bool()?))
                })
                .collect()
        })
        .unwrap_or_default();
    // Padded to the embedding's rows, as convert_hf_to_gguf.py pads (added tokens may repeat vocabulary entries).
    let ids = vocab.values().filter_map(|v| v.as_u64()).map(|v| v as usize).chain(added.iter().map(|a| a.0));
    let n = c.vocab_size.max(ids.max().map_or(0, |m| m + 1));
    let mut tokens: Vec<Option<String>> = vec![None; n];
    let mut types = vec![1i32; n];
    for (t, id) in vocab {
        let id = id.as_u64().context("a vocabulary id is not a number")? as usize;
        if id < n {
            tokens[id] = Some(t.clone());
        }
    }
    for (id, content, special) in &added {
        if *id < n {
            tokens[*id] = Some(content.clone());
            types[*id] = if *special { 3 } else { 4 };
        }
    }
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            Value::String(t.unwrap_or_else(|| {
                types[i] = 5;
                format!("[PAD{i}]")
            }))
        })
        .collect();
    let merges: Vec<Value> = json["model"]["merges"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|x| match x {
                    serde_json::Value::String(s) => Some(Value::String(s.clone())),
                    serde_json::Value::Array(p) => {
                        Some(Value::String(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?)))
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let id = |name: &str| tok.special(name).and_then(|t| tok.tokenizer.token_to_id(t));
    let mut md = vec![
        ("tokenizer.ggml.model".to_string(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), Value::String(pre_tokenizer(&c.model_type, c.vocab_size).into())),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges)),
        ("tokenizer.ggml.add_bos_token".to_string(), Value::Bool(tok.add_bos_token)),
    ];
    for (key, name) in [("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token"), ("unknown", "unk_token")]
    {
        if let Some(i) = id(name) {
            md.push((format!("tokenizer.ggml.{key}_token_id"), Value::U32(i)));
        }
    }
    if let Some(t) = chat_template.or(tok.chat_template.as_deref()) {
        md.push(("tokenizer.chat_template".to_string(), Value::String(t.to_string())));
    }
    Ok(md)
}
