//! Generation with a KV cache: each layer's keys and values of the tokens seen so far are kept, so a
//! new token costs one forward over itself. No graph is recorded.

use super::attention::repeat_kv;
use super::norm::rms_norm;
use super::rope::rope;
use super::Model;
use crate::train::graph::no_grad;
use candle_core::{DType, IndexOp, Tensor};

/// Keys and values per layer, [Hkv, tokens, hd] each, and how many tokens they cover.
#[derive(Default)]
pub struct KvCache {
    kv: Vec<Option<(Tensor, Tensor)>>,
    pub len: usize,
}

impl Model {
    /// Next-token logits of the last position with a KV cache (generation).
    pub fn step(&self, ids: &[u32], cache: &mut KvCache) -> candle_core::Result<Tensor> {
        no_grad(|| self.step_recorded(ids, cache))
    }

    fn step_recorded(&self, ids: &[u32], cache: &mut KvCache) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (hq, hkv, hd) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        let t = ids.len();
        let start = cache.len;
        let ids_t = Tensor::from_vec(ids.to_vec(), t, &self.device)?;
        let pos = Tensor::arange(start as u32, (start + t) as u32, &self.device)?;
        let (cos, sin) = self.rope.at(&pos)?;
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
            let ks = repeat_kv(&k, hq / hkv)?;
            let vs = repeat_kv(&v, hq / hkv)?;
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
