//! The decoder's forward, as the model's [`super::family::Arch`] puts it together: embeddings
//! (scaled), per layer the attention block (norm, q/k/v, q/k norms, rotary or none, attention with
//! the layer's window and the family's scale and soft-cap, output, norm after where the family has
//! one, residual scaled) and the MLP block (the same around the gated activation), then the final
//! norm. [`super::kv_cache`] and [`super::checkpointing`] run the same pieces.

use super::attention::{attention, Shape};
use super::layer::{Layer, Mlp};
use super::linear::Shared;
use super::mlp::gated;
use super::norm::rms_norm;
use super::rope::rope_partial;
use super::softmax::MaskCache;
use super::{Model, QuantEmbedding};
use crate::split::SplitMix64;
use crate::train::model::family::QkNorm;
use candle_core::{DType, Tensor};

/// cos and sin of each of the model's rotary embeddings at a batch's positions.
pub type Rotations = Vec<(Tensor, Tensor)>;

impl Model {
    /// cos and sin at `positions` [T] for every rotary embedding of the model.
    pub(super) fn rotations(&self, positions: &Tensor) -> candle_core::Result<Rotations> {
        self.rotary.iter().map(|r| r.at(positions)).collect()
    }

    /// Embedding rows of `ids` [T] -> [T, hidden] in the compute dtype, scaled as the family says.
    pub(super) fn embed_rows(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let rows = match &self.embed_q {
            None => self.embed.index_select(ids, 0)?.to_dtype(self.dtype)?,
            Some(QuantEmbedding { device: Some(d), .. }) => d.dense(&self.device, self.dtype)?.index_select(ids, 0)?,
            Some(QuantEmbedding { cpu, device: None }) => {
                let rows = cpu.dequantize_rows(&ids.to_vec1::<u32>()?);
                Tensor::from_vec(rows, (ids.dim(0)?, cpu.cols), &self.device)?.to_dtype(self.dtype)?
            }
        };
        match self.arch.embed_scale {
            1.0 => Ok(rows),
            s => rows * s,
        }
    }

    fn norm(&self, x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
        rms_norm(x, w, self.config.rms_norm_eps)
    }

    /// The final norm of the last layer's output.
    pub(super) fn final_norm(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.norm(x, &self.norm)
    }

    /// Final hidden states [T, hidden] for a flattened packed batch.
    pub fn hidden(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        seq_lengths: &[usize],
        mut rng: Option<&mut SplitMix64>,
    ) -> candle_core::Result<Tensor> {
        let rot = self.rotations(positions)?;
        let mut masks = MaskCache::default();
        self.routing.borrow_mut().clear();
        let mut x = self.embed_rows(ids)?;
        for layer in &self.layers {
            x = self.layer_forward(layer, &x, &rot, seq_lengths, &mut masks, rng.as_deref_mut(), None)?;
        }
        self.final_norm(&x)
    }

    /// One decoder layer on [T, hidden]; `kv` receives the layer's keys (after rope) and values.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn layer_forward(
        &self,
        layer: &Layer,
        x: &Tensor,
        rot: &Rotations,
        seq_lengths: &[usize],
        masks: &mut MaskCache,
        mut rng: Option<&mut SplitMix64>,
        kv: Option<&mut Vec<(Tensor, Tensor)>>,
    ) -> candle_core::Result<Tensor> {
        let (q, k, v) = self.attention_inputs(layer, x, rot, rng.as_deref_mut())?;
        let attn = attention(&q, &k, &v, seq_lengths, masks, self.attention_shape(layer))?;
        if let Some(kv) = kv {
            kv.push((k, v));
        }
        let x = self.attention_output(layer, x, &attn, rng.as_deref_mut())?;
        self.mlp_block(layer, &x, rng)
    }

    /// How `layer` attends: the family's scale and soft-cap, the layer's window and sinks.
    pub(super) fn attention_shape<'a>(&self, layer: &'a Layer) -> Shape<'a> {
        Shape {
            scale: self.arch.attn_scale as f32,
            window: layer.plan.window,
            softcap: self.arch.attn_softcap.map(|c| c as f32),
            sinks: layer.sinks.as_ref(),
        }
    }

    /// q [T, Hq, hd], k and v [T, Hkv, hd] of a layer's input x [T, hidden]: norm, projections,
    /// q/k norms, rotary embeddings at the positions of `rot` (none in a NoPE layer).
    pub(super) fn attention_inputs(
        &self,
        layer: &Layer,
        x: &Tensor,
        rot: &Rotations,
        mut rng: Option<&mut SplitMix64>,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let c = &self.config;
        let (hq, hkv, hd) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        let t = x.dim(0)?;
        let h = match &layer.norms[0] {
            Some(w) => self.norm(x, w)?,
            None => x.clone(),
        };
        let hs = Shared::new(&h);
        let (mut q, mut k, v) = match layer.qkv.as_slice() {
            [qkv] => {
                let y = qkv.forward_shared(&hs, rng)?;
                (y.narrow(1, 0, hq * hd)?, y.narrow(1, hq * hd, hkv * hd)?, y.narrow(1, (hq + hkv) * hd, hkv * hd)?)
            }
            [lq, lk, lv] => (
                lq.forward_shared(&hs, rng.as_deref_mut())?,
                lk.forward_shared(&hs, rng.as_deref_mut())?,
                lv.forward_shared(&hs, rng)?,
            ),
            _ => candle_core::bail!("a layer has q, k and v, or qkv"),
        };
        if let (QkNorm::Whole, Some(qn), Some(kn)) = (self.arch.qk_norm, &layer.q_norm, &layer.k_norm) {
            q = self.norm(&q, qn)?;
            k = self.norm(&k, kn)?;
        }
        q = q.reshape((t, hq, hd))?;
        k = k.reshape((t, hkv, hd))?;
        let v = v.reshape((t, hkv, hd))?;
        if let (QkNorm::PerHead, Some(qn), Some(kn)) = (self.arch.qk_norm, &layer.q_norm, &layer.k_norm) {
            q = self.norm(&q, qn)?;
            k = self.norm(&k, kn)?;
        }
        match layer.plan.rotary {
            Some(i) => {
                let (cos, sin) = &rot[i];
                Ok((rope_partial(&q, cos, sin)?, rope_partial(&k, cos, sin)?, v))
            }
            None => Ok((q, k, v)),
        }
    }

    /// The attention block's end: `x + s * norm(o(attn))` (the norm where the family has one after
    /// attention, s its residual multiplier).
    pub(super) fn attention_output(
        &self,
        layer: &Layer,
        x: &Tensor,
        attn: &Tensor,
        rng: Option<&mut SplitMix64>,
    ) -> candle_core::Result<Tensor> {
        let y = layer.o.forward(attn, rng)?;
        self.residual(x, &y, layer.norms[1].as_ref())
    }

    /// `x + s * norm(y)`.
    fn residual(&self, x: &Tensor, y: &Tensor, post: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let y = match post {
            Some(w) => self.norm(y, w)?,
            None => y.clone(),
        };
        match self.arch.residual_scale {
            1.0 => x + y,
            s => x + (y * s)?,
        }
    }

    /// The MLP block: `x + s * norm(mlp(n))` with `n = norm(x)`, the MLP dense
    /// (`down(act(gate(n), up(n)))`) or the mixture of experts (its routing recorded).
    pub(super) fn mlp_block(
        &self,
        layer: &Layer,
        x: &Tensor,
        mut rng: Option<&mut SplitMix64>,
    ) -> candle_core::Result<Tensor> {
        let h = match &layer.norms[2] {
            Some(w) => self.norm(x, w)?,
            None => x.clone(),
        };
        let y = match &layer.mlp {
            Mlp::Dense { gate_up, down } => {
                let hs = Shared::new(&h);
                let (g, u) = match gate_up.as_slice() {
                    [gate_up] => {
                        let y = gate_up.forward_shared(&hs, rng.as_deref_mut())?;
                        let half = y.dim(1)? / 2;
                        (y.narrow(1, 0, half)?.contiguous()?, y.narrow(1, half, half)?.contiguous()?)
                    }
                    [gate, up] => {
                        (gate.forward_shared(&hs, rng.as_deref_mut())?, up.forward_shared(&hs, rng.as_deref_mut())?)
                    }
                    _ => candle_core::bail!("a layer has gate and up, or gate_up"),
                };
                down.forward(&gated(self.arch.activation, &g, &u)?, rng)?
            }
            Mlp::Sparse(moe) => {
                let (y, routing) = moe.forward(&h, self.arch.activation)?;
                self.routing.borrow_mut().push((layer.index, routing));
                y
            }
        };
        self.residual(x, &y, layer.norms[3].as_ref())
    }

    /// The logits' input: final hidden states times the family's logit multiplier (Granite).
    pub(super) fn head_input(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        match self.arch.logit_scale {
            1.0 => Ok(h.clone()),
            s => h * s,
        }
    }

    /// Logits [N, vocab] in f32 of final hidden states [N, hidden], soft-capped where the family
    /// says (Gemma 2).
    pub(super) fn logits_of(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        let logits = super::head_weight::logits(&self.head_input(h)?, &self.lm_head)?.to_dtype(DType::F32)?;
        match self.arch.final_softcap {
            Some(c) => (logits / c)?.tanh()? * c,
            None => Ok(logits),
        }
    }
}
