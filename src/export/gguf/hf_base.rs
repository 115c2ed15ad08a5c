//! A Hugging Face model directory as a GGUF source, as llama.cpp's convert_hf_to_gguf.py reads it:
//! tensors under llama.cpp's names (Llama/Mistral q and k rows in its rotary order, Llama-3 rope
//! scaling as a `rope_freqs` tensor), the model's shape as `{arch}.*` keys, and the tokenizer as
//! `tokenizer.ggml.*` (a byte-level BPE vocabulary: tokens padded to the embedding's rows, token
//! types, merges, special ids, the pre-tokenizer by model family). A mixture of experts' experts are
//! stacked as llama.cpp holds them (`ffn_{gate,up,down}_exps` [E, rows, cols], the router as
//! `ffn_gate_inp`) with the expert counts among the keys. Tensors are read one at a time from the
//! memory-mapped safetensors.

use crate::gguf::names::pre_tokenizer;
use crate::gguf::rotary::to_gguf;
use crate::tokenize::TokenizerInfo;
use crate::train::model::config::ModelConfig;
use crate::train::model::family::{ExpertStorage, Family, Moe};
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// llama.cpp architectures that load `output.weight` without falling back to `token_embd.weight`.
const OUTPUT_REQUIRED: &[&str] = &["olmoe", "gpt-oss"];

pub struct HfBase {
    st: MmapedSafetensors,
    pub config: ModelConfig,
    /// llama.cpp name, where it comes from, shape.
    pub tensors: Vec<(String, Origin, Vec<usize>)>,
    rotary: bool,
}

/// Where a llama.cpp tensor comes from in the checkpoint.
#[derive(Clone)]
pub enum Origin {
    /// A tensor as it is.
    Tensor(String),
    /// One tensor per expert, stacked [E, rows, cols] (`ffn_gate_exps` from each expert's gate).
    Experts(Vec<String>),
    /// Half `.1` (0: the first) of a stacked [E, 2I, H] gate_up along its rows.
    Half(String, usize),
    /// Llama 3's rope scaling factors, derived from the config.
    RopeFreqs,
    /// gpt-oss's gate (`.1` = 0) or up (1) out of its transposed, interleaved `gate_up_proj` [E, H, 2I]
    /// (every other column) as [E, I, H]; of its bias [E, 2I], [E, I].
    Interleaved(String, usize),
    /// gpt-oss's transposed `down_proj` [E, I, H] as [E, H, I].
    Transposed(String),
}

/// One expert's tensor: (expert, Hugging Face name, shape).
type PerExpert = (usize, String, Vec<usize>);

/// gpt-oss's tensors llama.cpp holds otherwise than transformers: the experts split into gate and
/// up (de-interleaved, transposed) with their biases, the down experts transposed, the sinks as a
/// weight. None for another tensor or family.
fn gpt_oss_tensor(name: &str, shape: &[usize], family: &Family) -> Option<Vec<(String, Origin, Vec<usize>)>> {
    if !matches!(family.moe.map(|m| &m.stored), Some(ExpertStorage::Interleaved)) {
        return None;
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let blk = |kind: &str| format!("blk.{layer}.{kind}");
    let halves = |kind: &str, shape: Vec<usize>| {
        [("ffn_gate_exps", 0), ("ffn_up_exps", 1)]
            .into_iter()
            .map(|(g, h)| (blk(&format!("{g}.{kind}")), Origin::Interleaved(name.to_string(), h), shape.clone()))
            .collect()
    };
    Some(match rest {
        "self_attn.sinks" => vec![(blk("attn_sinks.weight"), Origin::Tensor(name.to_string()), shape.to_vec())],
        "mlp.experts.gate_up_proj" => halves("weight", vec![shape[0], shape[2] / 2, shape[1]]),
        "mlp.experts.gate_up_proj_bias" => halves("bias", vec![shape[0], shape[1] / 2]),
        "mlp.experts.down_proj" => {
            vec![(
                blk("ffn_down_exps.weight"),
                Origin::Transposed(name.to_string()),
                vec![shape[0], shape[2], shape[1]],
            )]
        }
        "mlp.experts.down_proj_bias" => {
            vec![(blk("ffn_down_exps.bias"), Origin::Tensor(name.to_string()), shape.to_vec())]
        }
        _ => return None,
    })
}

/// A mixture of experts' expert tensor `name`, as llama.cpp stacks it: (layer, its llama.cpp
/// tensor kind, the expert for a per-expert tensor, the half of a fused gate_up) or None.
fn expert_tensor(name: &str, family: &Family) -> Option<(usize, &'static str, Option<usize>, Option<usize>)> {
    let layout = family.moe?;
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let rest = rest.strip_suffix(".weight").unwrap_or(rest);
    // transformers' own fused names, then the family's stored layout.
    if let Some(p) = rest.strip_prefix(layout.block).and_then(|r| r.strip_prefix(".experts.")) {
        match p {
            "gate_up_proj" => return Some((layer, "ffn_gate_up_exps", None, None)),
            "down_proj" => return Some((layer, "ffn_down_exps", None, None)),
            _ => {}
        }
    }
    match &layout.stored {
        ExpertStorage::PerExpert { block, gate, up, down, .. } => {
            let (e, part) = rest.strip_prefix(block)?.strip_prefix(".experts.")?.split_once('.')?;
            let kind = [(gate, "ffn_gate_exps"), (up, "ffn_up_exps"), (down, "ffn_down_exps")]
                .into_iter()
                .find(|(n, _)| *n == &part)?
                .1;
            Some((layer, kind, Some(e.parse().ok()?), None))
        }
        // gpt-oss's are mapped by `gpt_oss_tensor`.
        ExpertStorage::Interleaved => None,
        ExpertStorage::Stacked { gate_up, down, .. } => {
            let part = rest.strip_prefix(layout.block)?.strip_prefix('.')?;
            match part {
                p if p == *gate_up => Some((layer, "ffn_gate_up_exps", None, None)),
                p if p == *down => Some((layer, "ffn_down_exps", None, None)),
                _ => None,
            }
        }
    }
}

impl HfBase {
    pub fn open(dir: &Path, family: &Family) -> Result<HfBase> {
        let naming = family.gguf;
        let rotary = naming.rotary_order;
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let files = crate::train::io::hf::safetensors_files(dir)?;
        let st = unsafe { MmapedSafetensors::multi(&files) }
            .with_context(|| format!("cannot read the safetensors of {}", dir.display()))?;
        let mut tensors = vec![];
        // Per-expert tensors by (layer, kind).
        let mut experts: BTreeMap<(usize, &str), Vec<PerExpert>> = BTreeMap::new();
        for (name, view) in st.tensors() {
            let shape = view.shape().to_vec();
            if let Some(mapped) = gpt_oss_tensor(&name, &shape, family) {
                tensors.extend(mapped);
                continue;
            }
            if let Some((layer, kind, expert, _)) = expert_tensor(&name, family) {
                match (kind, expert) {
                    (_, Some(e)) => experts.entry((layer, kind)).or_default().push((e, name.clone(), shape)),
                    ("ffn_gate_up_exps", None) => {
                        let half = [shape[0], shape[1] / 2, shape[2]];
                        for (h, k) in ["ffn_gate_exps", "ffn_up_exps"].into_iter().enumerate() {
                            tensors.push((
                                format!("blk.{layer}.{k}.weight"),
                                Origin::Half(name.clone(), h),
                                half.to_vec(),
                            ));
                        }
                    }
                    _ => tensors.push((format!("blk.{layer}.{kind}.weight"), Origin::Tensor(name.clone()), shape)),
                }
                continue;
            }
            match naming.tensor_to_gguf(&name) {
                Some(g) => tensors.push((g, Origin::Tensor(name.clone()), shape)),
                None if name.contains("rotary_emb") => {}
                None => bail!("{}: tensor {name} has no llama.cpp name", dir.display()),
            }
        }
        for ((layer, kind), mut list) in experts {
            list.sort_by_key(|e| e.0);
            if list.iter().enumerate().any(|(i, e)| e.0 != i) {
                bail!("{}: layer {layer}'s {kind} experts are not numbered 0..{}", dir.display(), list.len());
            }
            let shape = [vec![list.len()], list[0].2.clone()].concat();
            let names = list.into_iter().map(|e| e.1).collect();
            tensors.push((format!("blk.{layer}.{kind}.weight"), Origin::Experts(names), shape));
        }
        // Tied embeddings: llama.cpp's OLMoE and gpt-oss have no fallback to token_embd, so the output layer is
        // written too.
        let tied = !tensors.iter().any(|(g, ..)| g == "output.weight");
        if tied && OUTPUT_REQUIRED.contains(&naming.name) {
            let (_, origin, shape) =
                tensors.iter().find(|(g, ..)| g == "token_embd.weight").context("no token_embd")?;
            tensors.push(("output.weight".into(), origin.clone(), shape.clone()));
        }
        if config.rope_scaling.as_ref().is_some_and(|s| s.rope_type.as_deref() == Some("llama3")) {
            tensors.push(("rope_freqs.weight".into(), Origin::RopeFreqs, vec![config.head_dim() / 2]));
        }
        Ok(HfBase { st, config, tensors, rotary })
    }

    /// Tensor `gguf` in f32, rows in llama.cpp's order.
    pub fn load(&self, gguf: &str) -> Result<Tensor> {
        let (_, origin, _) = self.tensors.iter().find(|(g, ..)| g == gguf).context("unknown tensor")?;
        let read = |hf: &str| -> Result<Tensor> { Ok(self.st.load(hf, &Device::Cpu)?.to_dtype(DType::F32)?) };
        let t = match origin {
            Origin::RopeFreqs => {
                // Llama 3's rope scaling: the factor dividing each base frequency.
                let c = &self.config;
                let d = c.head_dim();
                let base: Vec<f64> = (0..d / 2).map(|i| 1.0 / c.rope_theta.powf(2.0 * i as f64 / d as f64)).collect();
                let factors: Vec<f32> = base.iter().zip(c.inv_freq()).map(|(b, s)| (b / s) as f32).collect();
                return Ok(Tensor::from_vec(factors, d / 2, &Device::Cpu)?);
            }
            Origin::Tensor(hf) => read(hf)?,
            Origin::Experts(names) => Tensor::stack(&names.iter().map(|n| read(n)).collect::<Result<Vec<_>>>()?, 0)?,
            Origin::Interleaved(hf, h) => {
                let t = read(hf)?;
                let cols = t.dim(t.rank() - 1)?;
                let picked = Tensor::arange_step(*h as u32, cols as u32, 2, &Device::Cpu)?;
                let t = t.index_select(&picked, t.rank() - 1)?;
                match t.rank() {
                    3 => t.transpose(1, 2)?.contiguous()?,
                    _ => t,
                }
            }
            Origin::Transposed(hf) => read(hf)?.transpose(1, 2)?.contiguous()?,
            Origin::Half(hf, h) => {
                let t = read(hf)?;
                let rows = t.dim(1)? / 2;
                t.narrow(1, h * rows, rows)?.contiguous()?
            }
        };
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
        let yarn = c.rope_scaling.as_ref().filter(|s| s.rope_type.as_deref() == Some("yarn") && arch == "gpt-oss");
        if let Some(t) =
            c.rope_scaling.as_ref().and_then(|s| s.rope_type.as_deref()).filter(|t| *t != "llama3" && yarn.is_none())
        {
            bail!(
                "rope scaling '{t}' is not written into a GGUF here; convert the model with llama.cpp's \
                 convert_hf_to_gguf.py and merge the adapter into that GGUF"
            );
        }
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
        if let Some(moe) = llama_cpp_moe(arch, c)? {
            md.push((format!("{arch}.expert_count"), u(moe.experts)));
            md.push((format!("{arch}.expert_used_count"), u(moe.top_k)));
            if arch == "qwen3moe" || arch == "gpt-oss" {
                md.push((format!("{arch}.expert_feed_forward_length"), u(moe.intermediate)));
            }
        }
        if arch == "gpt-oss" {
            md.extend(gpt_oss_metadata(c)?);
        }
        if let Some(y) = yarn {
            if y.truncate == Some(false) {
                crate::progress::warn(
                    "this config's YaRN leaves the ramp's bounds unrounded (truncate: false); llama.cpp rounds them, \
                     so its rotary frequencies differ slightly from transformers' and tunekit's",
                );
            }
            let f = |v: f64| Value::F32(v as f32);
            md.push((format!("{arch}.rope.scaling.type"), Value::String("yarn".into())));
            md.push((format!("{arch}.rope.scaling.factor"), f(y.factor.unwrap_or(1.0))));
            let original = y.original_max_position_embeddings.unwrap_or(c.max_position_embeddings);
            md.push((format!("{arch}.rope.scaling.original_context_length"), u(original)));
            md.push((format!("{arch}.rope.scaling.yarn_beta_fast"), f(y.beta_fast.unwrap_or(32.0))));
            md.push((format!("{arch}.rope.scaling.yarn_beta_slow"), f(y.beta_slow.unwrap_or(1.0))));
        }
        md.extend(tokenizer_metadata(tok, c, chat_template)?);
        Ok(md)
    }
}

/// gpt-oss's keys beyond the shape: the sliding window (on the even layers, as llama.cpp places it);
/// an error for a clamped SwiGLU other than the one llama.cpp computes (alpha 1.702, limit 7).
fn gpt_oss_metadata(c: &ModelConfig) -> Result<Vec<(String, Value)>> {
    let a = crate::train::model::family::describe(c)?;
    let clamp = a.moe.as_ref().and_then(|m| m.clamp).context("gpt-oss's experts are clamped")?;
    if (clamp.alpha - 1.702).abs() > 1e-6 || (clamp.limit - 7.0).abs() > 1e-6 {
        bail!(
            "this gpt-oss's experts clamp with swiglu_limit {} (alpha {}); llama.cpp's gpt-oss computes 7 (1.702), \
             so the GGUF would not be this model",
            clamp.limit,
            clamp.alpha
        );
    }
    let windows: Vec<Option<usize>> = a.layers.iter().map(|l| l.window).collect();
    let Some(window) = windows[0] else { bail!("llama.cpp's gpt-oss slides its window on the even layers") };
    if windows.iter().enumerate().any(|(i, w)| *w != (i % 2 == 0).then_some(window)) {
        bail!("this gpt-oss's sliding-window layers are not the even ones, which llama.cpp's gpt-oss assumes");
    }
    Ok(vec![("gpt-oss.attention.sliding_window".to_string(), Value::U32(window as u32))])
}

/// A mixture of experts as llama.cpp's `arch` computes it, or None for a dense model; an error
/// where llama.cpp would compute another model (it has no dense layers among the sparse ones, and
/// each architecture renormalises the top-k weights, or not, whatever the config says).
fn llama_cpp_moe(arch: &str, c: &ModelConfig) -> Result<Option<Moe>> {
    let a = crate::train::model::family::describe(c)?;
    let Some(moe) = a.moe else { return Ok(None) };
    if let Some(i) = a.layers.iter().position(|l| !l.sparse) {
        bail!(
            "layer {i} of this {} has a dense MLP among mixture-of-experts layers (mlp_only_layers / \
             decoder_sparse_step), which llama.cpp's {arch} cannot hold",
            c.model_type
        );
    }
    if arch == "olmoe" && c.kv_heads() != c.num_attention_heads {
        bail!(
            "this OLMoE has {} key/value heads for {} query heads; llama.cpp's olmoe holds the k norm over all \
             heads (no grouped-query attention), so the GGUF would not load",
            c.kv_heads(),
            c.num_attention_heads
        );
    }
    let renormalises = arch != "olmoe";
    if moe.renormalise != renormalises {
        bail!(
            "this {}'s norm_topk_prob is {}, but llama.cpp's {arch} always computes it as {renormalises}: \
             the GGUF would not be this model",
            c.model_type,
            moe.renormalise
        );
    }
    Ok(Some(moe))
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
