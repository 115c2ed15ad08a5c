//! A differentiable Llama-family causal LM (Llama 2/3, Mistral, Qwen2 with q/k/v bias, Qwen3 with
//! q/k norm; grouped-query attention; tied embeddings), built for training on packed rows:
//! positions come from `position_ids`, attention is causal inside each segment only, and logits
//! are computed only where a label trains, in chunks. candle-transformers' models are
//! inference-only (last-token logits, fused ops without backward), so this is our own.

use super::config::ModelConfig;
use super::fused::{attention, rms_norm, rope, swiglu};
use super::lora::{Linear, LoraSettings, Shared};
use super::ops::MaskCache;
use super::weights::BaseModel;
use crate::split::SplitMix64;
use anyhow::Result;
use candle_core::{DType, Device, IndexOp, Tensor, Var, D};

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

/// Rows of logits computed at a time by the loss head ([rows, vocab] in f32, with its gradient:
/// 2 x 25 MB for a 49k vocabulary); large enough for the GEMM to run at full speed.
pub const LOGITS_CHUNK: usize = 128;

pub struct Model {
    pub config: ModelConfig,
    /// The token embedding [vocab, hidden]; empty when held in NF4 (`embed_q`).
    pub embed: Tensor,
    pub embed_q: Option<QuantEmbedding>,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    /// The output projection (the embedding again when tied), frozen, dense or NF4.
    pub lm_head: Linear,
    cos: Tensor,
    sin: Tensor,
    pub device: Device,
    /// Compute dtype of the frozen weights and activations (f32 on the CPU, bf16 on a GPU).
    pub dtype: DType,
    /// Reward-model head [1, hidden] on the last token (trained; PEFT `modules_to_save = ["score"]`).
    pub score: Option<Var>,
}

/// An NF4 token embedding (QLoRA with `--qlora-embeddings`): rows are dequantised as looked up.
pub struct QuantEmbedding {
    pub cpu: std::sync::Arc<super::quant::Nf4Weight>,
    /// The same codes on the GPU, when training there.
    pub device: Option<super::quant::QuantOnDevice>,
}

/// One packed micro-batch, flattened: all rows' segments back to back.
pub struct Batch {
    pub input_ids: Tensor,    // [T] u32
    pub position_ids: Tensor, // [T] u32
    pub seq_lengths: Vec<usize>,
    /// Positions t whose next token is trained, and that token.
    pub loss_positions: Tensor, // [N] u32
    pub loss_targets: Tensor, // [N] u32
    pub tokens: usize,
    pub trained: usize,
}

impl Batch {
    /// From packed rows (labels aligned with input_ids; the loss predicts labels[t+1] from t).
    pub fn from_rows(rows: &[&crate::pack::rows::PackedRow], device: &Device) -> Result<Batch> {
        let (mut ids, mut pos, mut lens, mut lp, mut lt) = (vec![], vec![], vec![], vec![], vec![]);
        for r in rows {
            let base = ids.len();
            ids.extend(r.input_ids.iter().map(|&t| t as u32));
            pos.extend(r.position_ids.iter().map(|&p| p as u32));
            let mut at = 0usize;
            for &l in &r.seq_lengths {
                let l = l as usize;
                lens.push(l);
                for t in at..at + l - 1 {
                    let y = r.labels[t + 1];
                    if y != -100 {
                        lp.push((base + t) as u32);
                        lt.push(y as u32);
                    }
                }
                at += l;
            }
        }
        let (tokens, trained) = (ids.len(), lp.len());
        Ok(Batch {
            input_ids: Tensor::from_vec(ids, tokens, device)?,
            position_ids: Tensor::from_vec(pos, tokens, device)?,
            seq_lengths: lens,
            loss_positions: Tensor::from_vec(lp, trained, device)?,
            loss_targets: Tensor::from_vec(lt, trained, device)?,
            tokens,
            trained,
        })
    }
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
        // A projection comes dense, or already quantised by a QLoRA load (NF4 or the GGUF's own blocks).
        let weight = |p: &str| -> Result<Linear> {
            let mut l = match (base.nf4.get(p), base.quantized.get(p)) {
                (None, None) => Linear::new(p.to_string(), get(&format!("{p}.weight"))?, None),
                (q, g) => {
                    let mut l = Linear::new(p.to_string(), Tensor::zeros(0, DType::F32, device)?, None);
                    l.q = q.cloned();
                    l.gq = g.cloned();
                    if !device.is_cpu() {
                        l.dq = Some(match (q, g) {
                            (_, Some(g)) => super::quant::QuantOnDevice::gguf(g, device)?,
                            (Some(q), None) => super::quant::QuantOnDevice::Nf4(std::sync::Arc::new(
                                super::quant::Nf4OnDevice::upload(q, device)?,
                            )),
                            (None, None) => unreachable!("matched above"),
                        });
                    }
                    l
                }
            };
            l.bias = None;
            Ok(l)
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
        let on_device = |q: &std::sync::Arc<super::quant::Nf4Weight>| -> Result<Option<super::quant::QuantOnDevice>> {
            if device.is_cpu() {
                return Ok(None);
            }
            let up = super::quant::Nf4OnDevice::upload(q, device)?;
            Ok(Some(super::quant::QuantOnDevice::Nf4(std::sync::Arc::new(up))))
        };
        let quantised = |q: &std::sync::Arc<super::quant::Nf4Weight>, name: &str| -> Result<Linear> {
            let mut l = Linear::new(name.to_string(), Tensor::zeros(0, dtype, device)?, None);
            l.q = Some(q.clone());
            l.dq = on_device(q)?;
            Ok(l)
        };
        let (embed, embed_q) = match base.nf4.get("model.embed_tokens") {
            Some(q) => {
                (Tensor::zeros(0, dtype, device)?, Some(QuantEmbedding { cpu: q.clone(), device: on_device(q)? }))
            }
            None => (get("model.embed_tokens.weight")?, None),
        };
        let lm_head = match (c.tie_word_embeddings, base.nf4.get("lm_head"), &embed_q) {
            (false, Some(q), _) => quantised(q, "lm_head")?,
            (false, None, _) if base.tensors.contains_key("lm_head.weight") => {
                Linear::new("lm_head".into(), get("lm_head.weight")?, None)
            }
            (_, _, Some(e)) => {
                let mut l = quantised(&e.cpu, "lm_head")?;
                l.dq = e.device.clone();
                l
            }
            _ => Linear::new("lm_head".into(), embed.clone(), None),
        };
        let inv: Vec<f32> = c.inv_freq().iter().map(|&f| f as f32).collect();
        let max_pos = c.max_position_embeddings.max(4096);
        let t = Tensor::arange(0u32, max_pos as u32, device)?.to_dtype(DType::F32)?.reshape((max_pos, 1))?;
        let freqs = t.broadcast_mul(&Tensor::from_vec(inv.clone(), (1, inv.len()), device)?)?;
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?;
        Ok(Model {
            cos: emb.cos()?.to_dtype(dtype)?,
            sin: emb.sin()?.to_dtype(dtype)?,
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

    /// Adds a scalar reward head, initialised as transformers does (normal, std 0.02).
    pub fn add_score_head(&mut self, seed: u64) -> Result<()> {
        let h = self.config.hidden_size;
        let mut rng = SplitMix64::new(seed ^ 0x5C0);
        let w: Vec<f32> = (0..h)
            .map(|_| {
                let u1 = ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
                let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * 0.02) as f32
            })
            .collect();
        self.score = Some(Var::from_tensor(&Tensor::from_vec(w, (1, h), &self.device)?)?);
        Ok(())
    }

    /// The reward of one sequence: the score head on the last token's final hidden state.
    pub fn reward(&self, ids: &[i32]) -> candle_core::Result<Tensor> {
        let head = self.score.as_ref().ok_or_else(|| candle_core::Error::Msg("the model has no reward head".into()))?;
        let t = ids.len();
        let ids_t = Tensor::from_vec(ids.iter().map(|&x| x as u32).collect::<Vec<_>>(), t, &self.device)?;
        let pos = Tensor::arange(0u32, t as u32, &self.device)?;
        let h = self.hidden(&ids_t, &pos, &[t], None)?;
        h.narrow(0, t - 1, 1)?.to_dtype(DType::F32)?.matmul(&head.as_tensor().t()?)?.squeeze(1)?.squeeze(0)
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

    /// QLoRA on a GGUF base: use the file's own quantised projections (no re-quantisation).
    pub fn use_gguf_quantized(&mut self, path: &std::path::Path) -> Result<(usize, usize)> {
        let q = super::weights::gguf_quantized_projections(path)?;
        let (mut params, mut bytes) = (0, 0);
        for layer in &mut self.layers {
            for lin in layer.linears_mut() {
                let g = q
                    .get(&lin.name)
                    .ok_or_else(|| anyhow::anyhow!("{}: no quantised tensor for {}", path.display(), lin.name))?;
                let (r, c) = g.shape().dims2()?;
                params += r * c;
                bytes += g.storage_size_in_bytes();
                if !self.device.is_cpu() {
                    lin.dq = Some(super::quant::QuantOnDevice::gguf(g, &self.device)?);
                }
                lin.gq = Some(g.clone());
                lin.w = Tensor::zeros(0, DType::F32, &self.device)?;
            }
        }
        Ok((params, bytes))
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
                    out.push((format!("base_model.model.{}.lora_A.weight", lin.name), l.a.clone()));
                    out.push((format!("base_model.model.{}.lora_B.weight", lin.name), l.b.clone()));
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
        let rope = self.rope_at(positions)?;
        let mut masks = MaskCache::default();
        let mut x = self.embed_rows(ids)?;
        for layer in &self.layers {
            x = self.layer_forward(layer, &x, &rope, seq_lengths, &mut masks, rng.as_deref_mut())?;
        }
        rms_norm(&x, &self.norm, self.config.rms_norm_eps)
    }

    /// cos and sin gathered at the batch's positions.
    fn rope_at(&self, positions: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((self.cos.index_select(positions, 0)?, self.sin.index_select(positions, 0)?))
    }

    /// One decoder layer on [T, hidden].
    fn layer_forward(
        &self,
        layer: &Layer,
        x: &Tensor,
        (cos, sin): &(Tensor, Tensor),
        seq_lengths: &[usize],
        masks: &mut MaskCache,
        mut rng: Option<&mut SplitMix64>,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (hq, hkv, hd) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        let t = x.dim(0)?;
        let h = rms_norm(x, &layer.input_norm, c.rms_norm_eps)?;
        let hs = Shared::new(&h);
        let mut q = layer.q.forward_shared(&hs, rng.as_deref_mut())?.reshape((t, hq, hd))?;
        let mut k = layer.k.forward_shared(&hs, rng.as_deref_mut())?.reshape((t, hkv, hd))?;
        let v = layer.v.forward_shared(&hs, rng.as_deref_mut())?.reshape((t, hkv, hd))?;
        if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            q = rms_norm(&q, qn, c.rms_norm_eps)?;
            k = rms_norm(&k, kn, c.rms_norm_eps)?;
        }
        let q = rope(&q, cos, sin)?;
        let k = rope(&k, cos, sin)?;
        let attn = attention(&q, &k, &v, seq_lengths, masks)?;
        let x = (x + layer.o.forward(&attn, rng.as_deref_mut())?)?;
        let h = rms_norm(&x, &layer.post_norm, c.rms_norm_eps)?;
        let hs = Shared::new(&h);
        let g = layer.gate.forward_shared(&hs, rng.as_deref_mut())?;
        let u = layer.up.forward_shared(&hs, rng.as_deref_mut())?;
        x + layer.down.forward(&swiglu(&g, &u)?, rng)?
    }

    /// Gradient checkpointing: the loss sum of `loss_sum` and the gradients of `scale * loss` for
    /// every adapter variable (in `lora_vars` order), keeping only each layer's input during the forward and recomputing one
    /// layer at a time in the backward (the same dropout masks replayed). Peak memory is one layer's
    /// activations instead of all of them, for about one more forward pass.
    pub fn loss_and_grads_checkpointed(
        &self,
        batch: &Batch,
        rng: Option<&mut SplitMix64>,
        chunk: usize,
        scale: f64,
    ) -> candle_core::Result<(f64, Vec<Tensor>)> {
        let mut found: std::collections::HashMap<candle_core::TensorId, Tensor> = Default::default();
        if batch.trained == 0 {
            let zeros = self.lora_vars().iter().map(|(_, v)| v.zeros_like()).collect::<candle_core::Result<_>>()?;
            return Ok((0.0, zeros));
        }
        let rope = self.rope_at(&batch.position_ids)?;
        let mut masks = MaskCache::default();
        let mut rng_states = Vec::with_capacity(self.layers.len());
        let mut rng = rng;
        let mut inputs = Vec::with_capacity(self.layers.len());
        let mut x = self.embed_rows(&batch.input_ids)?;
        for layer in &self.layers {
            rng_states.push(rng.as_ref().map(|r| r.state()));
            let y = self.layer_forward(layer, &x, &rope, &batch.seq_lengths, &mut masks, rng.as_deref_mut())?;
            inputs.push(x);
            x = y.detach();
        }
        // The head: norm, logits at trained positions, cross-entropy; its gradient flows into x.
        let top = Var::from_tensor(&x)?;
        let h = rms_norm(top.as_tensor(), &self.norm, self.config.rms_norm_eps)?;
        let loss = self.head_loss(&h, batch, chunk)?;
        let loss_value = loss.to_scalar::<f32>()? as f64;
        let mut upstream = (loss * scale)?.backward()?.remove(top.as_tensor()).expect("the head depends on x");
        for (i, layer) in self.layers.iter().enumerate().rev() {
            let input = Var::from_tensor(&inputs[i])?;
            let mut replay = rng_states[i].map(SplitMix64::from_state);
            let y =
                self.layer_forward(layer, input.as_tensor(), &rope, &batch.seq_lengths, &mut masks, replay.as_mut())?;
            let mut grads = (y * &upstream)?.sum_all()?.backward()?;
            for lin in layer.linears() {
                if let Some(l) = &lin.lora {
                    for v in [&l.a, &l.b] {
                        if let Some(g) = grads.remove(v.as_tensor()) {
                            found.insert(v.as_tensor().id(), g);
                        }
                    }
                }
            }
            if i > 0 {
                upstream = grads.remove(input.as_tensor()).expect("a layer's output depends on its input");
            }
        }
        let grads = self
            .lora_vars()
            .iter()
            .map(|(n, v)| match found.remove(&v.as_tensor().id()) {
                Some(g) => Ok(g),
                None => Err(candle_core::Error::Msg(format!("no gradient reached {n}"))),
            })
            .collect::<candle_core::Result<_>>()?;
        Ok((loss_value, grads))
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

    /// Cross-entropy summed over the trained positions, from the final hidden states (logits only
    /// there, `chunk` rows at a time, none kept: [`super::fused::linear_cross_entropy`]).
    fn head_loss(&self, h: &Tensor, batch: &Batch, chunk: usize) -> candle_core::Result<Tensor> {
        if batch.trained == 0 {
            return Tensor::zeros((), DType::F32, &self.device);
        }
        let sel = h.index_select(&batch.loss_positions, 0)?;
        // A GPU has the memory for 8x larger chunks, and launches fewer kernels with them.
        let chunk = if self.device.is_cpu() { chunk } else { chunk * 8 };
        super::fused::linear_cross_entropy(&sel, &self.lm_head, &batch.loss_targets, chunk)
    }

    /// Next-token logits of the last position with a KV cache (generation).
    pub fn step(&self, ids: &[u32], cache: &mut KvCache) -> candle_core::Result<Tensor> {
        super::fused::no_grad(|| self.step_recorded(ids, cache))
    }

    fn step_recorded(&self, ids: &[u32], cache: &mut KvCache) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (hq, hkv, hd) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        let t = ids.len();
        let start = cache.len;
        let ids_t = Tensor::from_vec(ids.to_vec(), t, &self.device)?;
        let pos = Tensor::arange(start as u32, (start + t) as u32, &self.device)?;
        let cos = self.cos.index_select(&pos, 0)?;
        let sin = self.sin.index_select(&pos, 0)?;
        let mut x = self.embed_rows(&ids_t)?;
        let scale = 1.0 / (hd as f64).sqrt();
        for (li, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.input_norm, c.rms_norm_eps)?;
            let mut q = layer.q.forward(&h, None)?.reshape((t, hq, hd))?;
            let mut k = layer.k.forward(&h, None)?.reshape((t, hkv, hd))?;
            let v = layer.v.forward(&h, None)?.reshape((t, hkv, hd))?;
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                q = rms_norm(&q, qn, c.rms_norm_eps)?;
                k = rms_norm(&k, kn, c.rms_norm_eps)?;
            }
            let q = rope(&q, &cos, &sin)?.transpose(0, 1)?.contiguous()?; // [Hq, t, hd]
            let k = rope(&k, &cos, &sin)?.transpose(0, 1)?.contiguous()?; // [Hkv, t, hd]
            let v = v.transpose(0, 1)?.contiguous()?;
            let (k, v) = match cache.kv.get(li).cloned().flatten() {
                Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 1)?, Tensor::cat(&[&pv, &v], 1)?),
                None => (k, v),
            };
            if cache.kv.len() <= li {
                cache.kv.push(None);
            }
            cache.kv[li] = Some((k.clone(), v.clone()));
            let total = start + t;
            let ks = super::ops::repeat_kv(&k, hq / hkv)?;
            let vs = super::ops::repeat_kv(&v, hq / hkv)?;
            let mut scores = (q.matmul(&ks.t()?)?.to_dtype(DType::F32)? * scale)?; // [Hq, t, total]
            if t > 1 {
                let mask: Vec<f32> = (0..t * total)
                    .map(|i| if i % total > start + i / total { f32::NEG_INFINITY } else { 0.0 })
                    .collect();
                scores = scores.broadcast_add(&Tensor::from_vec(mask, (t, total), &self.device)?)?;
            }
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(self.dtype)?;
            let o = probs.matmul(&vs)?.transpose(0, 1)?.reshape((t, hq * hd))?;
            x = (x + layer.o.forward(&o, None)?)?;
            let h = rms_norm(&x, &layer.post_norm, c.rms_norm_eps)?;
            let g = layer.gate.forward(&h, None)?.silu()?;
            let u = layer.up.forward(&h, None)?;
            x = (x + layer.down.forward(&(g * u)?, None)?)?;
        }
        cache.len += t;
        let last = rms_norm(&x.i(t - 1..t)?, &self.norm, c.rms_norm_eps)?;
        self.lm_head.forward(&last, None)?.to_dtype(DType::F32)?.squeeze(0)
    }
}

#[derive(Default)]
pub struct KvCache {
    kv: Vec<Option<(Tensor, Tensor)>>,
    pub len: usize,
}
