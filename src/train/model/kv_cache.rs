//! Generation with a KV cache over a batch of sequences. [`Model::prefill`] runs the prompts as one
//! packed forward (each prompt its own segment) and keeps every layer's keys and values;
//! [`BatchCache::new`] lays them out left-padded, so that every row's next token goes into the same
//! column; [`Model::decode`] then runs one forward over all live rows per token, each row attending
//! to its own columns only. Rows that finish leave the batch ([`BatchCache::retain`]).
//! [`Model::extend`] (`extend.rs`) adds several tokens per row in one forward, so prompts that begin
//! alike (few-shot examples) read their common prefix once and each its own rest on top
//! ([`Model::start`]), a tile of tokens at a time. Memory stays linear in the prompts' length: the
//! prefill's attention is the training kernels' where they are tiled (the CPU in f32); elsewhere
//! the prompts are read by extending an empty cache; decoding's scores are one row per token, and
//! extending's a tile of rows. No graph is recorded.

use super::softmax::MaskCache;
use super::Model;
use crate::train::graph::no_grad;
use candle_core::{DType, Tensor};

/// Per layer the keys and values of every row, [B, Hkv, capacity, hd], left-padded.
pub struct BatchCache {
    pub(super) layers: Vec<(Tensor, Tensor)>,
    /// Columns in use (the same for every row).
    pub len: usize,
    pub(super) capacity: usize,
    /// Per row: its padding columns (its first token sits at this column).
    pub(super) pad: Vec<usize>,
    /// [B, capacity]: 0 where a row has a token, -inf at its padding.
    pub(super) mask: Tensor,
}

/// The keys and values of prompts from [`Model::prefill`]: per layer, all prompts' tokens back to
/// back ([T, Hkv, hd] each), with each prompt's length.
pub struct Prefilled {
    kv: Vec<(Tensor, Tensor)>,
    lengths: Vec<usize>,
    /// Next-token logits at the end of each prompt, [P, vocab] f32.
    pub logits: Tensor,
}

impl Model {
    /// Runs the prompts through the model as one packed batch, keeping every layer's keys and values.
    pub fn prefill(&self, prompts: &[&[u32]]) -> candle_core::Result<Prefilled> {
        self.routing.borrow_mut().clear();
        no_grad(|| {
            let lengths: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
            if lengths.contains(&0) {
                candle_core::bail!("an empty prompt cannot be continued");
            }
            let ids: Vec<u32> = prompts.iter().flat_map(|p| p.iter().copied()).collect();
            let pos: Vec<u32> = lengths.iter().flat_map(|&l| 0..l as u32).collect();
            let t = ids.len();
            let ids = Tensor::from_vec(ids, t, &self.device)?;
            let rot = self.rotations(&Tensor::from_vec(pos, t, &self.device)?)?;
            let mut masks = MaskCache::default();
            let mut kv = Vec::with_capacity(self.layers.len());
            let mut x = self.embed_rows(&ids)?;
            for layer in &self.layers {
                x = self.layer_forward(layer, &x, &rot, &lengths, &mut masks, None, Some(&mut kv))?;
            }
            let last: Vec<u32> = lengths
                .iter()
                .scan(0, |end, &l| {
                    *end += l;
                    Some(*end as u32 - 1)
                })
                .collect();
            let last = x.index_select(&Tensor::from_vec(last, prompts.len(), &self.device)?, 0)?;
            let logits = self.logits_of(&self.final_norm(&last)?)?;
            Ok(Prefilled { kv, lengths, logits })
        })
    }

    /// One token for every row of the cache (`tokens[b]` continues row b): next-token logits
    /// [B, vocab] f32.
    pub fn decode(&self, tokens: &[u32], cache: &mut BatchCache) -> candle_core::Result<Tensor> {
        no_grad(|| self.decode_recorded(tokens, cache))
    }

    fn decode_recorded(&self, tokens: &[u32], cache: &mut BatchCache) -> candle_core::Result<Tensor> {
        self.routing.borrow_mut().clear(); // generation keeps no routing
        let c = &self.config;
        let (hq, hkv, hd) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        let b = tokens.len();
        if b != cache.pad.len() {
            candle_core::bail!("decode: {b} tokens for {} cached rows", cache.pad.len());
        }
        if cache.len >= cache.capacity {
            candle_core::bail!("decode: the cache is full ({} columns)", cache.capacity);
        }
        let col = cache.len;
        let pos: Vec<u32> = cache.pad.iter().map(|&p| (col - p) as u32).collect();
        let rot = self.rotations(&Tensor::from_vec(pos, b, &self.device)?)?;
        let mask = cache.mask.narrow(1, 0, col + 1)?.reshape((b, 1, 1, col + 1))?;
        let mut x = self.embed_rows(&Tensor::from_vec(tokens.to_vec(), b, &self.device)?)?;
        for (layer, (kc, vc)) in self.layers.iter().zip(&cache.layers) {
            let (q, k, v) = self.attention_inputs(layer, &x, &rot, None)?;
            // This token's key and value go into column `col` of every row.
            kc.slice_set(&k.unsqueeze(2)?.contiguous()?, 2, col)?;
            vc.slice_set(&v.unsqueeze(2)?.contiguous()?, 2, col)?;
            let (ks, vs) = (kc.narrow(2, 0, col + 1)?, vc.narrow(2, 0, col + 1)?);
            // Grouped-query heads: the n query heads of a key/value head attend to it together.
            let q = q.reshape((b, hkv, hq / hkv, hd))?;
            let shape = self.attention_shape(layer);
            let mut scores = (q.matmul(&ks.transpose(2, 3)?)?.to_dtype(DType::F32)? * shape.scale as f64)?;
            if let Some(c) = shape.softcap {
                scores = ((scores / c as f64)?.tanh()? * c as f64)?;
            }
            let mut scores = scores.broadcast_add(&mask)?;
            if let Some(w) = shape.window.filter(|&w| w <= col) {
                // Columns `w` or more before this one are outside the window (the same for every row:
                // rows are left-padded, so a column's distance is its token's distance).
                let outside: Vec<f32> = (0..=col).map(|c| if col - c >= w { f32::NEG_INFINITY } else { 0.0 }).collect();
                scores = scores.broadcast_add(&Tensor::from_vec(outside, (1, 1, 1, col + 1), &self.device)?)?;
            }
            let probs = match shape.sinks {
                // Each head's sink as one more column, dropped after the softmax.
                Some(sinks) => {
                    let sink = sinks.reshape((1, hkv, hq / hkv, 1))?.broadcast_as((b, hkv, hq / hkv, 1))?;
                    let all = Tensor::cat(&[&scores, &sink.contiguous()?], 3)?;
                    candle_nn::ops::softmax_last_dim(&all)?.narrow(3, 0, col + 1)?
                }
                None => candle_nn::ops::softmax_last_dim(&scores)?,
            }
            .to_dtype(self.dtype)?;
            let o = probs.matmul(&vs)?.reshape((b, hq * hd))?;
            x = self.attention_output(layer, &x, &o, None)?;
            x = self.mlp_block(layer, &x, None)?;
        }
        cache.len += 1;
        self.logits_of(&self.final_norm(&x)?)
    }
}

/// Tokens per row in one forward of [`Model::extend`].
pub(super) const EXTEND_TILE: usize = 256;

/// Prompts share a prefix worth reading once from this many tokens.
const MIN_SHARED_PREFIX: usize = 16;

/// The length of the longest prefix all `prompts` share.
pub fn common_prefix(prompts: &[&[u32]]) -> usize {
    let Some((first, rest)) = prompts.split_first() else { return 0 };
    rest.iter().fold(first.len(), |n, p| first[..n].iter().zip(p.iter()).take_while(|(a, b)| a == b).count())
}

impl Model {
    /// The prompts read into a cache whose row `b` continues prompt `rows[b]`, with room for
    /// `new_tokens` more: each row's next-token logits [rows, vocab] f32, and the cache. With
    /// `share_prefix`, prompts that all begin with the same tokens (few-shot examples) read those
    /// once, then each its own rest on top of them ([`Model::extend`]).
    pub fn start(
        &self,
        prompts: &[&[u32]],
        rows: &[usize],
        new_tokens: usize,
        share_prefix: bool,
    ) -> candle_core::Result<(Tensor, BatchCache)> {
        let shortest = prompts.iter().map(|p| p.len()).min().unwrap_or(0);
        // Each prompt keeps a token of its own: the logits after it are the prompt's.
        let shared =
            if share_prefix && prompts.len() > 1 { common_prefix(prompts).min(shortest.max(1) - 1) } else { 0 };
        let idx = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), rows.len(), &self.device)?;
        if shared < MIN_SHARED_PREFIX {
            let (logits, cache) = self.read_prompts(prompts, rows, new_tokens)?;
            return Ok((logits.index_select(&idx, 0)?, cache));
        }
        let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0) - shared;
        let (_, mut cache) =
            self.read_prompts(&[&prompts[0][..shared]], &vec![0; prompts.len()], longest + new_tokens)?;
        let rests: Vec<&[u32]> = prompts.iter().map(|p| &p[shared..]).collect();
        let logits = self.extend(&rests, &mut cache)?;
        cache.retain(rows)?;
        Ok((logits.index_select(&idx, 0)?, cache))
    }

    /// Each prompt's next-token logits [P, vocab] f32, and a cache whose row `b` holds prompt
    /// `rows[b]` with room for `new_tokens` more. Where the training attention is tiled, one packed
    /// prefill; elsewhere (a GPU, bf16 on the CPU) it would keep each prompt's [heads, L, L] scores,
    /// so the prompts are read by extending an empty cache, a tile at a time.
    fn read_prompts(
        &self,
        prompts: &[&[u32]],
        rows: &[usize],
        new_tokens: usize,
    ) -> candle_core::Result<(Tensor, BatchCache)> {
        if super::attention::tiled_on(&self.device, self.dtype) {
            let pre = self.prefill(prompts)?;
            let cache = BatchCache::new(&pre, rows, new_tokens)?;
            return Ok((pre.logits, cache));
        }
        let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let mut cache = BatchCache::empty(self, prompts.len(), longest + new_tokens)?;
        let logits = self.extend(prompts, &mut cache)?;
        cache.retain(rows)?;
        Ok((logits, cache))
    }
}

impl BatchCache {
    /// A cache whose row `b` starts from prompt `rows[b]` of `pre`, with room for `new_tokens` more.
    pub fn new(pre: &Prefilled, rows: &[usize], new_tokens: usize) -> candle_core::Result<BatchCache> {
        let width = pre.lengths.iter().copied().max().unwrap_or(0);
        let capacity = width + new_tokens;
        let starts: Vec<usize> = pre
            .lengths
            .iter()
            .scan(0, |s, &l| {
                *s += l;
                Some(*s - l)
            })
            .collect();
        let pad: Vec<usize> = rows.iter().map(|&p| width - pre.lengths[p]).collect();
        let mut layers = Vec::with_capacity(pre.kv.len());
        for (k, v) in &pre.kv {
            // One prompt's [L, Hkv, hd] at the right end of a [Hkv, capacity, hd] row.
            let place = |t: &Tensor, p: usize| -> candle_core::Result<Tensor> {
                let (_, h, d) = t.dims3()?;
                let row = Tensor::zeros((h, capacity, d), t.dtype(), t.device())?;
                let seg = t.narrow(0, starts[p], pre.lengths[p])?.transpose(0, 1)?.contiguous()?;
                row.slice_set(&seg, 1, width - pre.lengths[p])?;
                Ok(row)
            };
            let ks = rows.iter().map(|&p| place(k, p)).collect::<candle_core::Result<Vec<_>>>()?;
            let vs = rows.iter().map(|&p| place(v, p)).collect::<candle_core::Result<Vec<_>>>()?;
            layers.push((Tensor::stack(&ks, 0)?, Tensor::stack(&vs, 0)?));
        }
        let mask: Vec<f32> =
            pad.iter().flat_map(|&p| (0..capacity).map(move |c| if c < p { f32::NEG_INFINITY } else { 0.0 })).collect();
        let device = pre.logits.device();
        Ok(BatchCache {
            layers,
            len: width,
            capacity,
            mask: Tensor::from_vec(mask, (rows.len(), capacity), device)?,
            pad,
        })
    }

    /// A cache of `rows` rows with nothing read yet and room for `capacity` tokens each.
    pub fn empty(m: &Model, rows: usize, capacity: usize) -> candle_core::Result<BatchCache> {
        let c = &m.config;
        let zeros = || Tensor::zeros((rows, c.kv_heads(), capacity, c.head_dim()), m.dtype, &m.device);
        let layers = m.layers.iter().map(|_| Ok((zeros()?, zeros()?))).collect::<candle_core::Result<Vec<_>>>()?;
        let mask = Tensor::zeros((rows, capacity), DType::F32, &m.device)?;
        Ok(BatchCache { layers, len: 0, capacity, pad: vec![0; rows], mask })
    }

    /// Rows in the cache.
    pub fn rows(&self) -> usize {
        self.pad.len()
    }

    /// Keeps only the rows `keep` (in that order; a row named twice is copied): finished rows leave
    /// the batch.
    pub fn retain(&mut self, keep: &[usize]) -> candle_core::Result<()> {
        let idx = Tensor::from_vec(keep.iter().map(|&r| r as u32).collect::<Vec<_>>(), keep.len(), self.mask.device())?;
        for (k, v) in self.layers.iter_mut() {
            *k = k.index_select(&idx, 0)?;
            *v = v.index_select(&idx, 0)?;
        }
        self.mask = self.mask.index_select(&idx, 0)?;
        self.pad = keep.iter().map(|&r| self.pad[r]).collect();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::model::config::ModelConfig;
    use candle_core::Device;

    /// A small random model of a family, with its own config keys in `extra`.
    fn tiny(model_type: &str, extra: serde_json::Value) -> Model {
        let dir = tempfile::tempdir().unwrap();
        let config = ModelConfig {
            model_type: model_type.into(),
            hidden_size: 32,
            intermediate_size: 48,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            head_dim: Some(8),
            vocab_size: 50,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            rope_scaling: None,
            rope_parameters: None,
            tie_word_embeddings: true,
            attention_bias: Some(false),
            max_position_embeddings: 128,
            bos_token_id: None,
            eos_token_id: None,
            hidden_act: None,
            extra: serde_json::from_value(extra).unwrap(),
        };
        crate::train::io::hf::write_random_model(&config, 7, dir.path()).unwrap();
        let base = crate::train::io::load_base(dir.path(), &Device::Cpu, None).unwrap();
        let mut m = Model::from_base(&base, &Device::Cpu).unwrap();
        // A nonzero adapter, so that decoding is checked with LoRA on.
        let s = crate::train::adapters::lora::LoraSettings::parse_targets("all-linear").unwrap();
        let s = crate::train::adapters::lora::LoraSettings {
            r: 2,
            alpha: 4.0,
            dropout: 0.0,
            rslora: false,
            targets: s,
            doubled_gate_up: false,
            train_router: false,
            use_dora: false,
            init: Default::default(),
        };
        m.add_lora(&s, 3).unwrap();
        for (i, (_, v)) in m.lora_vars().iter().enumerate() {
            let t = crate::train::graph::testing::rand(v.dims(), 100 + i as u64);
            v.set(&(t * 0.3).unwrap()).unwrap();
        }
        m
    }

    /// The full forward's logits at the last position of `ids`.
    fn last_logits(m: &Model, ids: &[u32]) -> Tensor {
        let t = ids.len();
        let x = Tensor::from_vec(ids.to_vec(), t, &Device::Cpu).unwrap();
        let pos = Tensor::arange(0u32, t as u32, &Device::Cpu).unwrap();
        m.logits(&x, &pos, &[t]).unwrap().get(t - 1).unwrap()
    }

    #[test]
    fn batched_decoding_with_uneven_prompts_equals_the_full_forward_of_each_row() {
        // Llama; Qwen3's q/k norms; Gemma 3's local layers with a window shorter than the sequences,
        // GeGLU and scaled embeddings; Gemma 2's soft-caps; Phi-3's fused projections; gpt-oss.
        let window = serde_json::json!({"sliding_window": 3, "layer_types": ["sliding_attention", "full_attention"]});
        let capped =
            serde_json::json!({"sliding_window": 4, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0});
        for (family, extra) in [
            ("llama", serde_json::json!({})),
            ("qwen3", serde_json::json!({})),
            ("gemma3_text", window),
            ("gemma2", capped),
            ("phi3", serde_json::json!({"partial_rotary_factor": 0.5})),
            // gpt-oss's sinks in every softmax, a window on layer 0, experts.
            ("gpt_oss", serde_json::json!({"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 3})),
        ] {
            let m = tiny(family, extra);
            let prompts: Vec<Vec<u32>> = vec![vec![3, 9, 27, 4, 8], vec![11, 2], vec![40, 41, 42]];
            let refs: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
            let pre = m.prefill(&refs).unwrap();
            // Rows 0 and 3 continue prompt 0, as the completions of one GRPO group do.
            let rows = [0usize, 1, 2, 0];
            let mut cache = BatchCache::new(&pre, &rows, 6).unwrap();
            let mut seqs: Vec<Vec<u32>> = rows.iter().map(|&p| prompts[p].clone()).collect();
            for (i, s) in seqs.iter().enumerate() {
                let d = (pre.logits.get(rows[i]).unwrap() - last_logits(&m, s)).unwrap().abs().unwrap();
                assert!(d.max(0).unwrap().to_scalar::<f32>().unwrap() < 1e-4, "prefill logits of row {i}");
            }
            let mut live: Vec<usize> = (0..rows.len()).collect();
            for step in 0..5 {
                let tokens: Vec<u32> = live.iter().map(|&r| ((r * 7 + step * 13) % 50) as u32).collect();
                let logits = m.decode(&tokens, &mut cache).unwrap();
                for (i, &r) in live.iter().enumerate() {
                    seqs[r].push(tokens[i]);
                    let d = (logits.get(i).unwrap() - last_logits(&m, &seqs[r])).unwrap().abs().unwrap();
                    let d = d.max(0).unwrap().to_scalar::<f32>().unwrap();
                    assert!(d < 1e-4, "{family}, step {step}, row {r}: {d}");
                }
                if step == 2 {
                    // Row 1 finishes and leaves the batch.
                    live = vec![0, 2, 3];
                    cache.retain(&[0, 2, 3]).unwrap();
                }
            }
        }
    }

    #[test]
    fn prompts_read_after_their_shared_prefix_equal_the_full_forward_of_each_row() {
        let window = serde_json::json!({"sliding_window": 5, "layer_types": ["sliding_attention", "full_attention"]});
        let capped =
            serde_json::json!({"sliding_window": 4, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0});
        for (family, extra) in [
            ("llama", serde_json::json!({})),
            ("gemma3_text", window),
            ("gemma2", capped),
            ("gpt_oss", serde_json::json!({"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 3})),
        ] {
            let m = tiny(family, extra);
            let prefix: Vec<u32> = (0..18).map(|k| (k * 5 + 3) % 50).collect();
            let rests: [&[u32]; 3] = [&[7, 8, 9, 10], &[20], &[30, 31]];
            let prompts: Vec<Vec<u32>> =
                rests.iter().map(|r| prefix.iter().chain(r.iter()).copied().collect()).collect();
            let refs: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
            assert_eq!(common_prefix(&refs), 18);
            let rows = [0usize, 1, 2, 1];
            let (logits, mut cache) = m.start(&refs, &rows, 4, true).unwrap();
            let mut seqs: Vec<Vec<u32>> = rows.iter().map(|&p| prompts[p].clone()).collect();
            for (i, s) in seqs.iter().enumerate() {
                let d = (logits.get(i).unwrap() - last_logits(&m, s)).unwrap().abs().unwrap().max(0).unwrap();
                assert!(d.to_scalar::<f32>().unwrap() < 1e-4, "{family}: the logits after prompt row {i}");
            }
            // The rests two tokens at a time (rows without a token in a tile sit it out), then on.
            let pre = m.prefill(&[&prefix]).unwrap();
            let mut tiled = BatchCache::new(&pre, &[0, 0, 0], 8).unwrap();
            let tiled_logits = m.extend_in_tiles(&rests, &mut tiled, 2).unwrap();
            for (i, s) in prompts.iter().enumerate() {
                let d = (tiled_logits.get(i).unwrap() - last_logits(&m, s)).unwrap().abs().unwrap().max(0).unwrap();
                assert!(d.to_scalar::<f32>().unwrap() < 1e-4, "{family}: the logits after prompt {i}, in tiles");
            }
            let next = m.decode(&[1, 2, 3], &mut tiled).unwrap();
            for (i, s) in prompts.iter().enumerate() {
                let s: Vec<u32> = s.iter().copied().chain([i as u32 + 1]).collect();
                let d = (next.get(i).unwrap() - last_logits(&m, &s)).unwrap().abs().unwrap().max(0).unwrap();
                assert!(d.to_scalar::<f32>().unwrap() < 1e-4, "{family}: decoding after the tiles, row {i}");
            }
            // Whole prompts from an empty cache (where attention is not tiled: a GPU, bf16), 8 at a
            // time, rows laid out as `rows` after.
            let mut empty = BatchCache::empty(&m, 3, 30).unwrap();
            let read = m.extend_in_tiles(&refs, &mut empty, 8).unwrap();
            empty.retain(&rows).unwrap();
            let next = m.decode(&[4, 5, 6, 7], &mut empty).unwrap();
            for (r, &p) in rows.iter().enumerate() {
                let d = (read.get(p).unwrap() - last_logits(&m, &prompts[p])).unwrap().abs().unwrap().max(0).unwrap();
                assert!(d.to_scalar::<f32>().unwrap() < 1e-4, "{family}: prompt {p} read from an empty cache");
                let s: Vec<u32> = prompts[p].iter().copied().chain([r as u32 + 4]).collect();
                let d = (next.get(r).unwrap() - last_logits(&m, &s)).unwrap().abs().unwrap().max(0).unwrap();
                assert!(d.to_scalar::<f32>().unwrap() < 1e-4, "{family}: decoding row {r} after an empty cache");
            }
            for step in 0..4 {
                let tokens: Vec<u32> = (0..rows.len()).map(|r| ((r * 7 + step * 13) % 50) as u32).collect();
                let logits = m.decode(&tokens, &mut cache).unwrap();
                for (r, s) in seqs.iter_mut().enumerate() {
                    s.push(tokens[r]);
                    let d = (logits.get(r).unwrap() - last_logits(&m, s)).unwrap().abs().unwrap().max(0).unwrap();
                    let d = d.to_scalar::<f32>().unwrap();
                    assert!(d < 1e-4, "{family}, step {step}, row {r}: {d}");
                }
            }
        }
    }

    #[test]
    fn embeddings_held_in_bf16_give_the_logits_of_their_rounded_values() {
        let mut m = tiny("llama", serde_json::json!({}));
        let ids = [3u32, 7, 11, 20];
        let full = last_logits(&m, &ids);
        m.hold_embeddings_in_bf16().unwrap();
        assert_eq!(m.embed.dtype(), DType::BF16, "QLoRA's embedding (and tied head) in bf16");
        let held = last_logits(&m, &ids);
        let d = (&held - full).unwrap().abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d > 0.0 && d < 0.05, "bf16 rounding of the embedding moves the logits by {d}");
        let (cached, _) = m.start(&[&ids], &[0], 1, false).unwrap();
        let d = (cached.get(0).unwrap() - held).unwrap().abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-5, "the cache's logits (the head a block of rows at a time) differ by {d}");
    }
}
