//! Base model weights in Hugging Face naming, from a model directory (config.json +
//! model.safetensors, or shards listed in model.safetensors.index.json) or a GGUF file
//! (llama.cpp names mapped back, Q/K rows un-permuted, tensors dequantised to f32).

use super::config::ModelConfig;
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub struct BaseModel {
    pub config: ModelConfig,
    /// Full-precision tensors by Hugging Face name (quantised projections are absent).
    pub tensors: HashMap<String, Tensor>,
    /// QLoRA: projections quantised to NF4 as they were read, by module path.
    pub nf4: HashMap<String, std::sync::Arc<super::quant::Nf4Weight>>,
    /// QLoRA on a GGUF base: the file's own quantised projections, by module path.
    pub quantized: HashMap<String, std::sync::Arc<candle_core::quantized::QTensor>>,
    pub source: PathBuf,
    /// Tokenizer and chat template from GGUF metadata, when the base is a GGUF file.
    pub gguf_metadata: Option<HashMap<String, gguf_file::Value>>,
}

impl BaseModel {
    pub fn load(path: &Path, device: &Device) -> Result<BaseModel> {
        Self::load_with(path, device, None)
    }

    /// Loads the base; with `qlora` ("nf4" or "gguf") the projections are quantised (or kept
    /// quantised) one tensor at a time as they are read, so the whole base is never in f32.
    pub fn load_with(path: &Path, device: &Device, qlora: Option<&str>) -> Result<BaseModel> {
        match qlora {
            None | Some("nf4") | Some("gguf") => {}
            Some(other) => bail!("--qlora {other}: use nf4 or gguf"),
        }
        if qlora == Some("gguf") && path.extension().is_none_or(|e| e != "gguf") {
            bail!("--qlora gguf needs a .gguf base model; use --qlora nf4 for a safetensors base");
        }
        if path.is_dir() {
            load_hf_dir(path, device, qlora == Some("nf4"))
        } else if path.extension().is_some_and(|e| e == "gguf") {
            load_gguf(path, device, qlora)
        } else if path.exists() {
            bail!(
                "{}: expected a Hugging Face model directory (config.json + *.safetensors) or a .gguf file",
                path.display()
            )
        } else {
            bail!("model {} does not exist", path.display())
        }
    }

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
    (name.contains(".self_attn.") || name.contains(".mlp.")) && name.ends_with("_proj.weight")
}

fn nf4_of(t: &Tensor) -> Result<std::sync::Arc<super::quant::Nf4Weight>> {
    let (r, c) = t.dims2()?;
    let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(std::sync::Arc::new(super::quant::Nf4Weight::quantize(&data, r, c)))
}

fn load_hf_dir(dir: &Path, device: &Device, nf4: bool) -> Result<BaseModel> {
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let files: Vec<PathBuf> = if dir.join("model.safetensors.index.json").exists() {
        let idx: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("model.safetensors.index.json"))?)?;
        let mut f: Vec<String> = idx["weight_map"]
            .as_object()
            .context("model.safetensors.index.json has no weight_map")?
            .values()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        f.sort();
        f.dedup();
        f.into_iter().map(|n| dir.join(n)).collect()
    } else if dir.join("model.safetensors").exists() {
        vec![dir.join("model.safetensors")]
    } else {
        bail!("{}: no model.safetensors or model.safetensors.index.json", dir.display());
    };
    let mut tensors = HashMap::new();
    let mut nf4_map = HashMap::new();
    // Memory-mapped: each tensor is materialised (and quantised, for QLoRA) on its own.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
        .with_context(|| format!("cannot read the safetensors of {}", dir.display()))?;
    let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    for name in names {
        let t = st.load(&name, device)?;
        if nf4 && is_projection(&name) {
            nf4_map.insert(name.trim_end_matches(".weight").to_string(), nf4_of(&t)?);
        } else {
            tensors.insert(name, t.to_dtype(DType::F32)?);
        }
    }
    Ok(BaseModel {
        config,
        tensors,
        nf4: nf4_map,
        quantized: HashMap::new(),
        source: dir.to_path_buf(),
        gguf_metadata: None,
    })
}

fn md_u(md: &HashMap<String, gguf_file::Value>, key: &str) -> Result<usize> {
    md.get(key)
        .with_context(|| format!("GGUF metadata has no '{key}'"))?
        .to_u32()
        .map(|v| v as usize)
        .map_err(Into::into)
}

fn md_f(md: &HashMap<String, gguf_file::Value>, key: &str) -> Option<f64> {
    md.get(key).and_then(|v| v.to_f32().ok()).map(|v| v as f64)
}

/// Undoes llama.cpp's rotary row permutation of q_proj/k_proj.
fn unpermute(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    Ok(w.reshape((n_head, out / n_head / 2, 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

/// The projection weights of a GGUF file as stored (quantised), Q/K rows put back in Hugging Face
/// order by moving whole rows; keyed by Hugging Face module path (`model.layers.0.self_attn.q_proj`).
pub fn gguf_quantized_projections(
    path: &Path,
) -> Result<HashMap<String, std::sync::Arc<candle_core::quantized::QTensor>>> {
    Ok(load_gguf(path, &Device::Cpu, Some("gguf"))?.quantized)
}

fn load_gguf(path: &Path, device: &Device, qlora: Option<&str>) -> Result<BaseModel> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let content =
        gguf_file::Content::read(&mut file).with_context(|| format!("{}: not a GGUF file", path.display()))?;
    let md = &content.metadata;
    let arch = md.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
    if arch != "llama" {
        bail!("{}: GGUF architecture '{arch}' is not supported (llama)", path.display());
    }
    let embd = content.tensor(&mut file, "token_embd.weight", device)?.dequantize(device)?;
    let (vocab, hidden) = embd.dims2()?;
    let n_head = md_u(md, "llama.attention.head_count")?;
    let n_kv = md_u(md, "llama.attention.head_count_kv").unwrap_or(n_head);
    let config = ModelConfig {
        model_type: "llama".into(),
        hidden_size: hidden,
        intermediate_size: md_u(md, "llama.feed_forward_length")?,
        num_hidden_layers: md_u(md, "llama.block_count")?,
        num_attention_heads: n_head,
        num_key_value_heads: Some(n_kv),
        head_dim: md_u(md, "llama.attention.key_length").ok(),
        vocab_size: vocab,
        rms_norm_eps: md_f(md, "llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        rope_theta: md_f(md, "llama.rope.freq_base").unwrap_or(10_000.0),
        rope_scaling: None,
        rope_parameters: None,
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        attention_bias: Some(false),
        max_position_embeddings: md_u(md, "llama.context_length").unwrap_or(2048),
        bos_token_id: md.get("tokenizer.ggml.bos_token_id").and_then(|v| v.to_u32().ok()).map(serde_json::Value::from),
        eos_token_id: md.get("tokenizer.ggml.eos_token_id").and_then(|v| v.to_u32().ok()).map(serde_json::Value::from),
        hidden_act: Some("silu".into()),
    };
    config.check()?;
    let mut tensors = HashMap::new();
    let (mut nf4_map, mut quantized) = (HashMap::new(), HashMap::new());
    tensors.insert("model.embed_tokens.weight".to_string(), embd);
    let names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    for name in names {
        let hf = match gguf_to_hf(&name) {
            Some(n) => n,
            None if name == "token_embd.weight" => continue,
            None => continue, // rope_freqs and other derived tensors
        };
        let heads = if name.ends_with("attn_q.weight") {
            Some(n_head)
        } else if name.ends_with("attn_k.weight") {
            Some(n_kv)
        } else {
            None
        };
        let q = content.tensor(&mut file, &name, device)?;
        if qlora == Some("gguf") && is_projection(&hf) {
            // Keep the file's blocks; move whole quantised rows back to Hugging Face order.
            let q = match heads {
                Some(h) => super::quant::permute_rows(&q, &super::quant::unpermute_rows(q.shape().dims2()?.0, h))?,
                None => q,
            };
            quantized.insert(hf.trim_end_matches(".weight").to_string(), std::sync::Arc::new(q));
            continue;
        }
        let mut t = q.dequantize(device)?;
        if let Some(h) = heads {
            t = unpermute(&t, h)?;
        }
        if qlora == Some("nf4") && is_projection(&hf) {
            nf4_map.insert(hf.trim_end_matches(".weight").to_string(), nf4_of(&t)?);
        } else {
            tensors.insert(hf, t);
        }
    }
    Ok(BaseModel {
        config,
        tensors,
        nf4: nf4_map,
        quantized,
        source: path.to_path_buf(),
        gguf_metadata: Some(content.metadata),
    })
}

/// llama.cpp tensor name -> Hugging Face name.
pub fn gguf_to_hf(name: &str) -> Option<String> {
    if name == "output_norm.weight" {
        return Some("model.norm.weight".into());
    }
    if name == "output.weight" {
        return Some("lm_head.weight".into());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, t) = rest.split_once('.')?;
    let hf = match t {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// A small randomly initialised model (normal, std 0.02; norms at 1) with the given config, written
/// as a Hugging Face directory: a stand-in base for demos and tests when no checkpoint is at hand.
pub fn write_random_model(config: &ModelConfig, seed: u64, out: &Path) -> Result<()> {
    let device = Device::Cpu;
    let mut rng = crate::split::SplitMix64::new(seed);
    let mut normal = |shape: (usize, usize)| -> Result<Tensor> {
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| {
                let u1 = ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
                let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * 0.02) as f32
            })
            .collect();
        Ok(Tensor::from_vec(v, shape, &device)?)
    };
    let (h, i, v) = (config.hidden_size, config.intermediate_size, config.vocab_size);
    let (q, kv) = (config.num_attention_heads * config.head_dim(), config.kv_heads() * config.head_dim());
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert("model.embed_tokens.weight".into(), normal((v, h))?);
    t.insert("model.norm.weight".into(), Tensor::ones(h, DType::F32, &device)?);
    for l in 0..config.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (n, shape) in [
            ("self_attn.q_proj", (q, h)),
            ("self_attn.k_proj", (kv, h)),
            ("self_attn.v_proj", (kv, h)),
            ("self_attn.o_proj", (h, q)),
            ("mlp.gate_proj", (i, h)),
            ("mlp.up_proj", (i, h)),
            ("mlp.down_proj", (h, i)),
        ] {
            t.insert(format!("{p}.{n}.weight"), normal(shape)?);
        }
        for n in ["input_layernorm", "post_attention_layernorm"] {
            t.insert(format!("{p}.{n}.weight"), Tensor::ones(h, DType::F32, &device)?);
        }
        if config.qk_norm() {
            for n in ["self_attn.q_norm", "self_attn.k_norm"] {
                t.insert(format!("{p}.{n}.weight"), Tensor::ones(config.head_dim(), DType::F32, &device)?);
            }
        }
    }
    if !config.tie_word_embeddings {
        t.insert("lm_head.weight".into(), normal((v, h))?);
    }
    std::fs::create_dir_all(out)?;
    candle_core::safetensors::save(&t, out.join("model.safetensors"))?;
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(config)?)?;
    Ok(())
}
