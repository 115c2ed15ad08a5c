//! Reading several tokens per row into a KV cache in one forward ([`Model::extend`]): prompts'
//! rests after a shared prefix, and on devices where the training attention is not tiled the
//! prompts themselves. Long rests go a tile of tokens at a time, so the scores are [B, heads, tile,
//! columns], linear in the cache's length.

use super::kv_cache::{BatchCache, EXTEND_TILE};
use super::Model;
use crate::train::graph::no_grad;
use candle_core::{DType, Tensor};

impl Model {
    /// Several tokens for every row of the cache (`tokens[b]` continues row b), in forwards of up to
    /// [`EXTEND_TILE`] tokens per row. Rows may differ in length: each row's tokens end at the same
    /// column, a shorter row's cached columns moved right to meet them (more left padding).
    /// Next-token logits after each row's last token, [B, vocab] f32.
    pub fn extend(&self, tokens: &[&[u32]], cache: &mut BatchCache) -> candle_core::Result<Tensor> {
        self.extend_in_tiles(tokens, cache, EXTEND_TILE)
    }

    pub(super) fn extend_in_tiles(
        &self,
        tokens: &[&[u32]],
        cache: &mut BatchCache,
        tile: usize,
    ) -> candle_core::Result<Tensor> {
        let h = self.extend_hidden_in_tiles(tokens, cache, tile)?;
        let ends: Vec<u32> = tokens
            .iter()
            .scan(0, |end, t| {
                *end += t.len();
                Some(*end as u32 - 1)
            })
            .collect();
        let last = h.index_select(&Tensor::from_vec(ends, tokens.len(), &self.device)?, 0)?;
        no_grad(|| self.logits_of(&last))
    }

    /// [`Model::extend`]'s final hidden states (normed) of every token given, [N, hidden], row after
    /// row in order. Logits of a few of them at a time: [`Model::logits_of_hidden`].
    pub fn extend_hidden(&self, tokens: &[&[u32]], cache: &mut BatchCache) -> candle_core::Result<Tensor> {
        self.extend_hidden_in_tiles(tokens, cache, EXTEND_TILE)
    }

    /// The rows, right-aligned, `tile` columns at a time (a row with no token in a tile sits it
    /// out): each forward's scores [B, heads, tile, cols] are linear in the cache's length.
    fn extend_hidden_in_tiles(
        &self,
        tokens: &[&[u32]],
        cache: &mut BatchCache,
        tile: usize,
    ) -> candle_core::Result<Tensor> {
        let s = tokens.iter().map(|t| t.len()).max().unwrap_or(0);
        if s <= tile {
            return no_grad(|| self.extend_recorded(tokens, cache));
        }
        let mut parts: Vec<Vec<Tensor>> = vec![vec![]; tokens.len()];
        for a in (0..s).step_by(tile) {
            let pieces: Vec<&[u32]> = tokens
                .iter()
                .map(|t| {
                    let offset = s - t.len();
                    &t[a.saturating_sub(offset).min(t.len())..(a + tile).saturating_sub(offset).min(t.len())]
                })
                .collect();
            let h = no_grad(|| self.extend_recorded(&pieces, cache))?;
            let mut at = 0;
            for (part, piece) in parts.iter_mut().zip(&pieces).filter(|(_, p)| !p.is_empty()) {
                part.push(h.narrow(0, at, piece.len())?);
                at += piece.len();
            }
        }
        Tensor::cat(&parts.into_iter().flatten().collect::<Vec<_>>(), 0)
    }

    /// Next-token logits [N, vocab] f32 of final hidden states [N, hidden].
    pub fn logits_of_hidden(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        no_grad(|| self.logits_of(h))
    }

    fn extend_recorded(&self, tokens: &[&[u32]], cache: &mut BatchCache) -> candle_core::Result<Tensor> {
        self.routing.borrow_mut().clear();
        let c = &self.config;
        let (hq, hkv, hd) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        let g = hq / hkv;
        let b = tokens.len();
        let s = tokens.iter().map(|t| t.len()).max().unwrap_or(0);
        if b != cache.pad.len() || s == 0 {
            candle_core::bail!("extend: tokens for the {} cached rows (none for some is fine)", cache.pad.len());
        }
        let col = cache.len;
        if col + s > cache.capacity {
            candle_core::bail!("extend: {s} tokens do not fit the cache ({} of {} columns used)", col, cache.capacity);
        }
        let cols = col + s;
        // A row with fewer tokens than s moves its cached columns right by the difference (in each
        // layer, below), so that its tokens end at column cols and it stays left-padded: a
        // column's distance is its token's distance, as sliding windows need.
        let gaps: Vec<usize> = tokens.iter().map(|t| s - t.len()).collect();
        for (p, g) in cache.pad.iter_mut().zip(&gaps) {
            *p += g;
        }
        let close_gaps = |x: &Tensor| -> candle_core::Result<()> {
            for (r, &gap) in gaps.iter().enumerate().filter(|(_, g)| **g > 0) {
                // [cached | gap | new | free] -> [gap | cached | new | free]
                let row = x.get(r)?;
                let (h, cap, d) = row.dims3()?;
                let zeros = Tensor::zeros((h, gap, d), row.dtype(), row.device())?;
                let moved =
                    Tensor::cat(&[&zeros, &row.narrow(1, 0, col)?, &row.narrow(1, col + gap, cap - col - gap)?], 1)?;
                x.slice_set(&moved.unsqueeze(0)?, 0, r)?;
            }
            Ok(())
        };
        let row_mask: Vec<Vec<f32>> = cache
            .pad
            .iter()
            .map(|&p| (0..cache.capacity).map(|c| if c < p { f32::NEG_INFINITY } else { 0.0 }).collect())
            .collect();
        // The real tokens, row after row ([N, hidden] through the projections and the MLP), and
        // for each of the B * s places of the attention's [B, s] layout its token, or N (a zero
        // row) in a gap.
        let n: usize = tokens.iter().map(|t| t.len()).sum();
        let (mut ids, mut pos, mut place) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(b * s));
        let mut real = Vec::with_capacity(n);
        for (r, t) in tokens.iter().enumerate() {
            let gap = gaps[r];
            place.extend(std::iter::repeat_n(n as u32, gap).chain(ids.len() as u32..(ids.len() + t.len()) as u32));
            real.extend((r * s + gap..(r + 1) * s).map(|p| p as u32));
            ids.extend(t.iter().copied());
            pos.extend((col + gap..cols).map(|k| (k - cache.pad[r]) as u32));
        }
        let place = Tensor::from_vec(place, b * s, &self.device)?;
        let real = Tensor::from_vec(real, n, &self.device)?;
        let rot = self.rotations(&Tensor::from_vec(pos, n, &self.device)?)?;
        // [N, h, hd] to the [B * s, h, hd] layout, zeros in the gaps.
        let spread = |t: &Tensor| -> candle_core::Result<Tensor> {
            let (_, h, d) = t.dims3()?;
            Tensor::cat(&[t, &Tensor::zeros((1, h, d), t.dtype(), t.device())?], 0)?.index_select(&place, 0)
        };
        // [B, 1, 1, s, cols] per window: a row's own columns, causal among the new ones. A gap
        // token attends to itself (its output is never used; no row of the softmax is empty).
        let mut masks: Vec<(Option<usize>, Tensor)> = vec![];
        let mut mask_for = |window: Option<usize>| -> candle_core::Result<Tensor> {
            if let Some((_, m)) = masks.iter().find(|(w, _)| *w == window) {
                return Ok(m.clone());
            }
            let mut m = vec![f32::NEG_INFINITY; b * s * cols];
            for (r, rm) in row_mask.iter().enumerate() {
                for j in 0..s {
                    let q = col + j;
                    let line = &mut m[(r * s + j) * cols..(r * s + j + 1) * cols];
                    for (k, x) in line.iter_mut().enumerate().take(q + 1) {
                        if (rm[k] == 0.0 && window.is_none_or(|w| q - k < w)) || k == q {
                            *x = 0.0;
                        }
                    }
                }
            }
            let m = Tensor::from_vec(m, (b, 1, 1, s, cols), &self.device)?;
            masks.push((window, m.clone()));
            Ok(m)
        };
        let mut x = self.embed_rows(&Tensor::from_vec(ids, n, &self.device)?)?;
        for (layer, (kc, vc)) in self.layers.iter().zip(&cache.layers) {
            let (q, k, v) = self.attention_inputs(layer, &x, &rot, None)?;
            let (q, k, v) = (spread(&q)?, spread(&k)?, spread(&v)?);
            let heads = |t: Tensor| t.reshape((b, s, hkv, hd))?.transpose(1, 2)?.contiguous();
            kc.slice_set(&heads(k)?, 2, col)?;
            vc.slice_set(&heads(v)?, 2, col)?;
            close_gaps(kc)?;
            close_gaps(vc)?;
            let (ks, vs) = (kc.narrow(2, 0, cols)?, vc.narrow(2, 0, cols)?);
            // [B, Hkv, g*s, hd]: the g query heads of a key/value head, each over the s tokens.
            let q =
                q.reshape((b, s, hkv, g, hd))?.permute((0, 2, 3, 1, 4))?.contiguous()?.reshape((b, hkv, g * s, hd))?;
            let shape = self.attention_shape(layer);
            let mut scores = (q.matmul(&ks.transpose(2, 3)?)?.to_dtype(DType::F32)? * shape.scale as f64)?;
            if let Some(c) = shape.softcap {
                scores = ((scores / c as f64)?.tanh()? * c as f64)?;
            }
            let scores = scores.reshape((b, hkv, g, s, cols))?.broadcast_add(&mask_for(shape.window)?)?;
            let probs = match shape.sinks {
                Some(sinks) => {
                    let sink = sinks.reshape((1, hkv, g, 1, 1))?.broadcast_as((b, hkv, g, s, 1))?;
                    let all = Tensor::cat(&[&scores, &sink.contiguous()?], 4)?;
                    candle_nn::ops::softmax_last_dim(&all)?.narrow(4, 0, cols)?
                }
                None => candle_nn::ops::softmax_last_dim(&scores)?,
            }
            .to_dtype(self.dtype)?;
            let o = probs.reshape((b, hkv, g * s, cols))?.matmul(&vs)?;
            let o = o.reshape((b, hkv, g, s, hd))?.permute((0, 3, 1, 2, 4))?.contiguous()?.reshape((b * s, hq * hd))?;
            let o = o.index_select(&real, 0)?;
            x = self.attention_output(layer, &x, &o, None)?;
            x = self.mlp_block(layer, &x, None)?;
        }
        cache.len = cols;
        let flat: Vec<f32> = row_mask.into_iter().flatten().collect();
        cache.mask = Tensor::from_vec(flat, (b, cache.capacity), &self.device)?;
        self.final_norm(&x)
    }
}
