//! A differentiable Llama-family causal LM (Llama 2/3, Mistral, Qwen2 with q/k/v bias, Qwen3 with
//! q/k norm; grouped-query attention; tied embeddings), built for training on packed rows:
//! positions come from `position_ids`, attention is causal inside each segment only, and logits
//! are computed only where a label trains, in chunks. candle-transformers' models are
//! inference-only (last-token logits, fused ops without backward), so this is our own.
//!
//! One file per piece, each one graph node with a hand-written backward (see `train::graph`):
//! [`norm`] (RMSNorm), [`rope`] (rotary embeddings), [`attention`] over packed segments with its
//! [`softmax`], [`linear`] (the frozen base linear, dense or [`quant`]ised, with its adapter),
//! [`mlp`] (SwiGLU), [`head`] (the chunked loss head). The decoder that wires them is here;
//! [`checkpointing`] recomputes it layer by layer, [`kv_cache`] runs it one token at a time.
//! [`base`] is the frozen base as loaded, [`config`] its shape, [`batch`] the input.

pub mod attention;
pub mod base;
pub mod batch;
pub mod checkpointing;
pub mod config;
pub mod head;
pub mod kv_cache;
pub mod linear;
pub mod memory;
pub mod mlp;
pub mod norm;
pub mod quant;
pub mod reward_head;
pub mod rope;
pub mod softmax;

use crate::split::SplitMix64;
use crate::train::adapters::lora::{peft_key, LoraSettings};
use anyhow::Result;
use attention::attention;
use base::BaseModel;
use batch::Batch;
use candle_core::{DType, Device, Tensor, Var};
use config::ModelConfig;
use linear::{Linear, Shared, Weight};
use mlp::swiglu;
use norm::rms_norm;
use quant::{Nf4OnDevice, Nf4Weight, QuantOnDevice};
use rope::{rope, RopeTable};
use softmax::MaskCache;
use std::sync::Arc;

pub struct Layer {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    pub input_norm: Tensor,
    pub post_norm: Tensor,
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
}

impl Layer {
    pub fn linears(&self) -> [&Linear; 7] {
        [&self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down]
    }
    pub fn linears_mut(&mut self) -> [&mut Linear; 7] {
        [&mut self.q, &mut self.k, &mut self.v, &mut self.o, &mut self.gate, &mut self.up, &mut self.down]
    }
}

/// Rows of logits computed at a time by the loss head on the CPU ([rows, vocab] in f32, the
/// gradient written over them: 50 MB for a 49k vocabulary). Every chunk's two products pack the
/// whole head weight again: at 128 rows they ran at 200 GFLOP/s, at 256 at 240-255, near the
/// projections' speed (`cargo bench --bench kernels`, "Loss head by chunks of rows").
pub const LOGITS_CHUNK: usize = 256;

/// A GPU's chunks are this many times larger (fewer kernel launches; the memory is there).
const GPU_CHUNK_FACTOR: usize = 4;

pub struct Model {
    pub config: ModelConfig,
    /// The token embedding [vocab, hidden]; empty when held in NF4 (`embed_q`).
    pub embed: Tensor,
    pub embed_q: Option<QuantEmbedding>,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    /// The output projection (the embedding again when tied), frozen, dense or NF4.
    pub lm_head: Linear,
    rope: RopeTable,
    pub device: Device,
    /// Compute dtype of the frozen weights and activations (f32 on the CPU, bf16 on a GPU).
    pub dtype: DType,
    /// Reward-model head [1, hidden] on the last token (trained; PEFT `modules_to_save = ["score"]`).
    pub score: Option<Var>,
}

/// An NF4 token embedding (QLoRA with `--qlora-embeddings`): rows are dequantised as looked up.
pub struct QuantEmbedding {
    pub cpu: Arc<Nf4Weight>,
    /// The same codes on the GPU, when training there.
    pub device: Option<QuantOnDevice>,
}

impl Model {
    /// The model in f32 on `device` (the CPU for generation, eval, merge and the tests).
    pub fn from_base(base: &BaseModel, device: &Device) -> Result<Model> {
        Self::from_base_as(base, device, DType::F32)
    }

    /// The model on `device` with its frozen weights and activations in `dtype` (bf16 on a GPU);
    /// adapters stay f32 whatever `dtype` is.
    pub fn from_base_as(base: &BaseModel, device: &Device, dtype: DType) -> Result<Model> {
        let c = base.config.clone();
        let get = |n: &str| -> Result<Tensor> { Ok(base.get(n)?.to_dtype(dtype)?.to_device(device)?) };
        let opt = |n: &str| -> Result<Option<Tensor>> {
            match base.tensors.get(n) {
                Some(t) => Ok(Some(t.to_dtype(dtype)?.to_device(device)?)),
                None => Ok(None),
            }
        };
        let nf4_on_device = |q: &Arc<Nf4Weight>| -> Result<Option<QuantOnDevice>> {
            if device.is_cpu() {
                return Ok(None);
            }
            Ok(Some(QuantOnDevice::Nf4(Arc::new(Nf4OnDevice::upload(q, device)?))))
        };
        // A projection comes dense, or already quantised by a QLoRA load (NF4 or the GGUF's own blocks).
        let weight = |p: &str| -> Result<Linear> {
            let held = match (base.nf4.get(p), base.quantized.get(p)) {
                (_, Some(g)) => {
                    let gpu = if device.is_cpu() { None } else { Some(QuantOnDevice::gguf(g, device)?) };
                    Weight::Gguf { cpu: g.clone(), gpu }
                }
                (Some(q), None) => Weight::Nf4 { cpu: q.clone(), gpu: nf4_on_device(q)? },
                (None, None) => return Ok(Linear::new(p.to_string(), get(&format!("{p}.weight"))?, None)),
            };
            Ok(Linear::quantised(p.to_string(), held, device))
        };
        let lin = |p: &str| -> Result<Linear> {
            let mut l = weight(p)?;
            l.bias = if c.qkv_bias() { opt(&format!("{p}.bias"))? } else { None };
            Ok(l)
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                q: lin(&format!("{p}.self_attn.q_proj"))?,
                k: lin(&format!("{p}.self_attn.k_proj"))?,
                v: lin(&format!("{p}.self_attn.v_proj"))?,
                o: weight(&format!("{p}.self_attn.o_proj"))?,
                gate: weight(&format!("{p}.mlp.gate_proj"))?,
                up: weight(&format!("{p}.mlp.up_proj"))?,
                down: weight(&format!("{p}.mlp.down_proj"))?,
                input_norm: get(&format!("{p}.input_layernorm.weight"))?,
                post_norm: get(&format!("{p}.post_attention_layernorm.weight"))?,
                q_norm: if c.qk_norm() { Some(get(&format!("{p}.self_attn.q_norm.weight"))?) } else { None },
                k_norm: if c.qk_norm() { Some(get(&format!("{p}.self_attn.k_norm.weight"))?) } else { None },
            });
        }
        let (embed, embed_q) = match base.nf4.get("model.embed_tokens") {
            Some(q) => {
                (Tensor::zeros(0, dtype, device)?, Some(QuantEmbedding { cpu: q.clone(), device: nf4_on_device(q)? }))
            }
            None => (get("model.embed_tokens.weight")?, None),
        };
        let nf4_head = |cpu: &Arc<Nf4Weight>, gpu: Option<QuantOnDevice>| {
            Linear::quantised("lm_head".into(), Weight::Nf4 { cpu: cpu.clone(), gpu }, device)
        };
        let lm_head = match (c.tie_word_embeddings, base.nf4.get("lm_head"), &embed_q) {
            (false, Some(q), _) => nf4_head(q, nf4_on_device(q)?),
            (false, None, _) if base.tensors.contains_key("lm_head.weight") => {
                Linear::new("lm_head".into(), get("lm_head.weight")?, None)
            }
            (_, _, Some(e)) => nf4_head(&e.cpu, e.device.clone()),
            _ => Linear::new("lm_head".into(), embed.clone(), None),
        };
        let rope = RopeTable::new(&c.inv_freq(), c.max_position_embeddings.max(4096), dtype, device)?;
        Ok(Model {
            rope,
            dtype,
            config: c,
            embed,
            embed_q,
            layers,
            norm: get("model.norm.weight")?,
            lm_head,
            device: device.clone(),
            score: None,
        })
    }

    /// Adds LoRA adapters to the target modules of every layer.
    pub fn add_lora(&mut self, s: &LoraSettings, seed: u64) -> Result<()> {
        let mut rng = SplitMix64::new(seed);
        for layer in &mut self.layers {
            for lin in layer.linears_mut() {
                // As PEFT matches target_modules: the module's name, or its full path or a suffix of it
                // (PEFT saves "all-linear" resolved to full paths such as model.layers.0.mlp.up_proj).
                let hit = s.targets.iter().any(|t| lin.name == *t || lin.name.ends_with(&format!(".{t}")));
                if hit {
                    lin.add_lora(s, &mut rng)?;
                }
            }
        }
        Ok(())
    }

    /// Bytes per parameter of the frozen projections as held (4 for f32, ~0.52 NF4, 0.625 Q4_1).
    pub fn projection_bytes_per_param(&self) -> f64 {
        let (params, bytes) = self.projections_held();
        bytes as f64 / params.max(1) as f64
    }

    /// (parameters, bytes) of the seven projections of every layer as held.
    fn projections_held(&self) -> (usize, usize) {
        self.layers.iter().flat_map(|l| l.linears()).map(|l| l.held()).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    }

    /// Bytes per parameter of all the frozen weight matrices as held: projections, the embedding
    /// and an untied lm_head (norms are negligible and left out).
    pub fn base_bytes_per_param(&self) -> f64 {
        let (mut params, mut bytes) = self.projections_held();
        params += self.config.vocab_size * self.config.hidden_size;
        bytes += match &self.embed_q {
            Some(e) => e.cpu.bytes(),
            None => self.embed.elem_count() * self.dtype.size_in_bytes(),
        };
        if !self.config.tie_word_embeddings {
            let (p, b) = self.lm_head.held();
            params += p;
            bytes += b;
        }
        bytes as f64 / params.max(1) as f64
    }

    /// Switches every adapter on or off (off: the reference model of DPO).
    pub fn set_lora_enabled(&self, on: bool) {
        for layer in &self.layers {
            for lin in layer.linears() {
                if let Some(l) = &lin.lora {
                    l.enabled.set(on);
                }
            }
        }
    }

    /// Sum of the log-probabilities of the trained tokens of one sequence (labels aligned with ids,
    /// -100 where not trained): log p(answer | prompt).
    pub fn sequence_logp(
        &self,
        ids: &[i32],
        labels: &[i32],
        rng: Option<&mut SplitMix64>,
    ) -> candle_core::Result<Tensor> {
        let row = crate::pack::rows::PackedRow {
            input_ids: ids.to_vec(),
            labels: labels.to_vec(),
            position_ids: (0..ids.len() as i32).collect(),
            seq_lengths: vec![ids.len() as i32],
        };
        let b = Batch::from_rows(&[&row], &self.device).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        self.loss_sum(&b, rng, LOGITS_CHUNK)?.neg()
    }

    /// Trainable variables with their PEFT names, in a fixed order.
    pub fn lora_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for layer in &self.layers {
            for lin in layer.linears() {
                if let Some(l) = &lin.lora {
                    out.push((peft_key(&lin.name, "A"), l.a.clone()));
                    out.push((peft_key(&lin.name, "B"), l.b.clone()));
                }
            }
        }
        out
    }

    /// Embedding rows of `ids` [T] -> [T, hidden] in the compute dtype.
    fn embed_rows(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match &self.embed_q {
            None => self.embed.index_select(ids, 0),
            Some(QuantEmbedding { device: Some(d), .. }) => d.dense(&self.device, self.dtype)?.index_select(ids, 0),
            Some(QuantEmbedding { cpu, device: None }) => {
                let rows = cpu.dequantize_rows(&ids.to_vec1::<u32>()?);
                Tensor::from_vec(rows, (ids.dim(0)?, cpu.cols), &self.device)?.to_dtype(self.dtype)
            }
        }
    }

    /// Final hidden states [T, hidden] for a flattened packed batch.
    pub fn hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        seq_lengths: &[usize],
        mut rng: Option<&mut SplitMix64>,
    ) -> candle_core::Result<Tensor> {
        let rope = self.rope.at(positions)?;
        let mut masks = MaskCache::default();
        let mut x = self.embed_rows(ids)?;
        for layer in &self.layers {
            x = self.layer_forward(layer, &x, &rope, seq_lengths, &mut masks, rng.as_deref_mut(), None)?;
        }
        rms_norm(&x, &self.norm, self.config.rms_norm_eps)
    }

    /// One decoder layer on [T, hidden]; `kv` receives the layer's keys (after rope) and values.
    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        layer: &Layer,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        seq_lengths: &[usize],
        masks: &mut MaskCache,
        mut rng: Option<&mut SplitMix64>,
        kv: Option<&mut Vec<(Tensor, Tensor)>>,
    ) -> candle_core::Result<Tensor> {
        let (q, k, v) = self.attention_inputs(layer, x, rope, rng.as_deref_mut())?;
        let attn = attention(&q, &k, &v, seq_lengths, masks)?;
        if let Some(kv) = kv {
            kv.push((k, v));
        }
        let x = (x + layer.o.forward(&attn, rng.as_deref_mut())?)?;
        self.mlp_block(layer, &x, rng)
    }

    /// q [T, Hq, hd], k and v [T, Hkv, hd] of a layer's input x [T, hidden]: norm, projections,
    /// q/k norms (Qwen3), rotary embeddings at the positions of `cos`/`sin`.
    fn attention_inputs(
        &self,
        layer: &Layer,
        x: &Tensor,
        (cos, sin): &(Tensor, Tensor),
        mut rng: Option<&mut SplitMix64>,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let c = &self.config;
        let (hq, hkv, hd) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        let t = x.dim(0)?;
        let h = rms_norm(x, &layer.input_norm, c.rms_norm_eps)?;
        let hs = Shared::new(&h);
        let mut q = layer.q.forward_shared(&hs, rng.as_deref_mut())?.reshape((t, hq, hd))?;
        let mut k = layer.k.forward_shared(&hs, rng.as_deref_mut())?.reshape((t, hkv, hd))?;
        let v = layer.v.forward_shared(&hs, rng)?.reshape((t, hkv, hd))?;
        if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            q = rms_norm(&q, qn, c.rms_norm_eps)?;
            k = rms_norm(&k, kn, c.rms_norm_eps)?;
        }
        Ok((rope(&q, cos, sin)?, rope(&k, cos, sin)?, v))
    }

    /// The second half of a layer: `x + down(swiglu(gate(n), up(n)))` with `n = norm(x)`.
    fn mlp_block(&self, layer: &Layer, x: &Tensor, mut rng: Option<&mut SplitMix64>) -> candle_core::Result<Tensor> {
        let h = rms_norm(x, &layer.post_norm, self.config.rms_norm_eps)?;
        let hs = Shared::new(&h);
        let g = layer.gate.forward_shared(&hs, rng.as_deref_mut())?;
        let u = layer.up.forward_shared(&hs, rng.as_deref_mut())?;
        x + layer.down.forward(&swiglu(&g, &u)?, rng)?
    }

    /// Full logits [T, vocab] (for parity checks and generation).
    pub fn logits(&self, ids: &Tensor, positions: &Tensor, seq_lengths: &[usize]) -> candle_core::Result<Tensor> {
        let h = self.hidden(ids, positions, seq_lengths, None)?;
        self.lm_head.forward(&h, None)?.to_dtype(DType::F32)
    }

    /// Sum of token cross-entropies over the trained positions of the batch (divide by the number
    /// of trained tokens of the whole accumulated batch outside). Logits only where labels train,
    /// `chunk` rows at a time.
    pub fn loss_sum(&self, batch: &Batch, rng: Option<&mut SplitMix64>, chunk: usize) -> candle_core::Result<Tensor> {
        let h = self.hidden(&batch.input_ids, &batch.position_ids, &batch.seq_lengths, rng)?;
        self.head_loss(&h, batch, chunk)
    }

    /// Per-token log-probabilities at `temperature` of the batch's trained tokens (the completion
    /// tokens of RL rollouts), differentiable in the adapters, and their entropies when asked.
    pub fn token_log_probs(
        &self,
        batch: &Batch,
        temperature: f64,
        entropy: bool,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let h = self.hidden(&batch.input_ids, &batch.position_ids, &batch.seq_lengths, None)?;
        self.log_probs_at(&h, batch, temperature, entropy)
    }

    /// `token_log_probs` from final hidden states already computed.
    pub fn log_probs_at(
        &self,
        h: &Tensor,
        batch: &Batch,
        temperature: f64,
        entropy: bool,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let sel = h.index_select(&batch.loss_positions, 0)?;
        let chunk = if self.device.is_cpu() { LOGITS_CHUNK } else { LOGITS_CHUNK * GPU_CHUNK_FACTOR };
        head::linear_log_probs(&sel, &self.lm_head, &batch.loss_targets, temperature, chunk, entropy)
    }

    /// Cross-entropy summed over the trained positions, from the final hidden states (logits only
    /// there, `chunk` rows at a time, none kept: [`head::linear_cross_entropy`]).
    fn head_loss(&self, h: &Tensor, batch: &Batch, chunk: usize) -> candle_core::Result<Tensor> {
        if batch.trained == 0 {
            return Tensor::zeros((), DType::F32, &self.device);
        }
        let sel = h.index_select(&batch.loss_positions, 0)?;
        let chunk = if self.device.is_cpu() { chunk } else { chunk * GPU_CHUNK_FACTOR };
        head::linear_cross_entropy(&sel, &self.lm_head, &batch.loss_targets, chunk)
    }
}
