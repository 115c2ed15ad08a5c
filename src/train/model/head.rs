//! The loss head: scores of `h W^T` against the next tokens at the trained positions, `chunk` rows of
//! logits at a time, as the summed cross-entropy of SFT ([`linear_cross_entropy`]) or per-token
//! log-probabilities at a sampling temperature with their entropies, for RL ([`linear_log_probs`]);
//! logits soft-capped first where the family says (Gemma 2: `c * tanh(z / c)`, its slope applied to
//! each chunk's gradient).
//! Each chunk's input gradient is computed with its logits, so no logits outlive their chunk and
//! none are kept for the backward; an NF4 head on the CPU is dequantised a block of vocabulary rows
//! at a time, never whole. A trained head (full fine-tuning) gets its weight's gradient from the
//! same chunks.

use super::head_weight::HeadWeight;
use super::linear::{Linear, Weight};
use crate::train::cpu::softmax;
use crate::train::graph::attached_forward;
use crate::train::graph::contiguous_f32;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, InplaceOp1, Layout, Tensor, D};

/// The loss head: `sum_i CE(h_i W^T, t_i)` over the trained positions' hidden states h [N, hidden],
/// `chunk` rows at a time. When training, each chunk's gradient with respect to its rows,
/// `(softmax - onehot) W`, is computed right after its logits, so no logits outlive their chunk
/// (the logits of 2,048 positions over a 49k vocabulary are 400 MB in f32); the backward is then
/// `g * dh`. The head is frozen (no LoRA on lm_head), so only the input gradient is needed.
pub fn linear_cross_entropy(
    h: &Tensor,
    head: &Linear,
    targets: &Tensor,
    chunk: usize,
    softcap: Option<f64>,
) -> candle_core::Result<Tensor> {
    let scale = LogitScale { softcap, temperature: 1.0 };
    if let Some(w) = trained_weight(head) {
        // Full fine-tuning: the weight's gradient `sum over chunks of d^T h` too, in the same pass.
        let want = Want { grad: true, weight_grad: true, ..Want::default() };
        let s = score_rows(h, &HeadWeight::new(head, h)?, targets, scale, chunk, want)?;
        let total = s.nll.sum_all()?;
        return match (s.dh, s.dw) {
            (Some(dh), Some(dw)) => Ok(total.with_backward2(h, w, HeadGradsFn { dh, dw })),
            _ => Ok(total),
        };
    }
    let want = Want { grad: h.track_op(), ..Want::default() };
    let s = score_rows(h, &HeadWeight::new(head, h)?, targets, scale, chunk, want)?;
    let total = s.nll.sum_all()?;
    match s.dh {
        Some(dh) => Ok(total.with_backward1(h, InputGradFn { dh, per_row: false })),
        None => Ok(total),
    }
}

/// Per-token log-probabilities `log softmax(h_i W^T / temperature)[t_i]` [N] (differentiable in h,
/// and in W when it is trained), and, when asked, the entropies of those distributions [N] (values
/// only), as TRL scores completions.
pub fn linear_log_probs(
    h: &Tensor,
    head: &Linear,
    targets: &Tensor,
    temperature: f64,
    chunk: usize,
    want_entropy: bool,
    softcap: Option<f64>,
) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    let scale = LogitScale { softcap, temperature };
    let trained = trained_weight(head);
    let want = Want { grad: h.track_op() && trained.is_none(), entropy: want_entropy, ..Want::default() };
    let s = score_rows(h, &HeadWeight::new(head, h)?, targets, scale, chunk, want)?;
    let logp = s.nll.neg()?;
    let entropy = s.entropy;
    if let Some(w) = trained {
        // Each row's gradient depends on its upstream value: recomputed chunk by chunk in the backward.
        let op = RecomputedHeadFn { targets: targets.clone(), scale, chunk };
        return Ok((logp.with_backward2(h, w, op), entropy));
    }
    match s.dh {
        // d logp / d h = -(d nll / d h), per row.
        Some(dh) => Ok((logp.with_backward1(h, InputGradFn { dh: dh.neg()?, per_row: true }), entropy)),
        None => Ok((logp, entropy)),
    }
}

/// The head's weight when it is trained (full fine-tuning) and a graph is recorded.
fn trained_weight(head: &Linear) -> Option<&Tensor> {
    match &head.weight {
        Weight::Dense(w) if w.is_variable() && crate::train::graph::recording() => Some(w),
        _ => None,
    }
}

/// What a pass over the head computes beside the scores.
#[derive(Default)]
struct Want {
    /// The input gradient `d nll_i / d h_i` (times `row_weights` where given).
    grad: bool,
    /// The weight's gradient, summed over the rows.
    weight_grad: bool,
    entropy: bool,
    /// Each row's multiplier of its gradients (the upstream gradient of per-row scores).
    row_weights: Option<Tensor>,
}

/// The backward of the summed cross-entropy over a trained head: both gradients, computed in the
/// forward, times the upstream scalar.
struct HeadGradsFn {
    dh: Tensor,
    dw: Tensor,
}

impl CustomOp2 for HeadGradsFn {
    fn name(&self) -> &'static str {
        "linear-head-trained"
    }

    attached_forward!(2);

    fn bwd(
        &self,
        _h: &Tensor,
        _w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.to_dtype(self.dh.dtype())?;
        Ok((Some(self.dh.broadcast_mul(&g)?), Some(self.dw.broadcast_mul(&g)?)))
    }
}

/// The backward of per-row log-probabilities over a trained head: the scores recomputed a chunk
/// at a time, each row's `d logp / d logits` weighted by its upstream gradient, then both
/// gradients from them (no logits kept between the forward and the backward).
struct RecomputedHeadFn {
    targets: Tensor,
    scale: LogitScale,
    chunk: usize,
}

impl CustomOp2 for RecomputedHeadFn {
    fn name(&self) -> &'static str {
        "linear-head-log-probs-trained"
    }

    attached_forward!(2);

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // d logp / d logits = -(d nll / d logits): the rows weighted by -g.
        let row_weights = Some(g.detach().to_dtype(DType::F32)?.neg()?);
        let want = Want { grad: true, weight_grad: true, entropy: false, row_weights };
        let weight = HeadWeight::Dense(w.detach());
        let s = score_rows(&h.detach(), &weight, &self.targets, self.scale, self.chunk, want)?;
        Ok((s.dh, s.dw))
    }
}

/// Row scores of one pass over the head: negative log-likelihoods [N], their input gradient
/// `d nll_i / d h_i` [N, hidden], the weight's gradient [vocab, hidden] and entropies [N] as asked.
struct RowScores {
    nll: Tensor,
    dh: Option<Tensor>,
    dw: Option<Tensor>,
    entropy: Option<Tensor>,
}

/// How logits become scores: soft-capped where set, then divided by the temperature.
#[derive(Debug, Clone, Copy)]
struct LogitScale {
    softcap: Option<f64>,
    temperature: f64,
}

fn score_rows(
    h: &Tensor,
    weight: &HeadWeight,
    targets: &Tensor,
    scale: LogitScale,
    chunk: usize,
    want: Want,
) -> candle_core::Result<RowScores> {
    let n = h.dim(0)?;
    let hd = h.detach();
    let want_grad = want.grad || want.weight_grad;
    let (mut nll, mut dh, mut entropy) = (vec![], vec![], vec![]);
    let mut dw: Option<Tensor> = None;
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let rows = hd.narrow(0, start, len)?;
        let mut logits = weight.logits(&rows)?;
        // Soft-capped: scores of c * tanh(z / c), whose gradient reaches z times 1 - tanh^2.
        let mut slope = None;
        if let Some(c) = scale.softcap {
            let t = (logits / c)?.tanh()?;
            slope = if want_grad { Some((1.0 - t.sqr()?)?) } else { None };
            logits = (t * c)?;
        }
        let targets = targets.narrow(0, start, len)?;
        let s = token_scores(logits, &targets, scale.temperature, want_grad, want.entropy)?;
        if let Some(d) = s.grad {
            let mut d = match &slope {
                Some(k) => (d * k)?,
                None => d,
            };
            if let Some(rw) = &want.row_weights {
                d = d.broadcast_mul(&rw.narrow(0, start, len)?.to_dtype(d.dtype())?.unsqueeze(1)?)?;
            }
            if want.weight_grad {
                let part = d.t()?.matmul(&rows)?;
                dw = Some(match dw {
                    Some(a) => (a + part)?,
                    None => part,
                });
            }
            if want.grad {
                dh.push(weight.input_grad(&d)?);
            }
        }
        nll.push(s.nll);
        entropy.extend(s.entropy);
        start += len;
    }
    let cat = |v: Vec<Tensor>| -> candle_core::Result<Tensor> {
        if v.is_empty() {
            Tensor::zeros(0, DType::F32, h.device())
        } else {
            Tensor::cat(&v, 0)
        }
    };
    let dw = match (want.weight_grad, dw) {
        (true, None) => Some(weight.zeros()?),
        (_, dw) => dw,
    };
    Ok(RowScores {
        nll: cat(nll)?,
        dh: if want.grad && n > 0 {
            Some(cat(dh)?)
        } else if want.grad {
            Some(hd.zeros_like()?)
        } else {
            None
        },
        dw,
        entropy: if want.entropy { Some(cat(entropy)?) } else { None },
    })
}

/// The backward of the head's scores: their input gradient, computed in the forward. A scalar
/// total (`per_row: false`) scales every row by its gradient; per-row scores scale each row by its own.
struct InputGradFn {
    dh: Tensor,
    per_row: bool,
}

impl CustomOp1 for InputGradFn {
    fn name(&self) -> &'static str {
        "linear-head-scores"
    }

    attached_forward!(1);

    fn bwd(&self, _h: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = g.to_dtype(self.dh.dtype())?;
        let g = if self.per_row { g.unsqueeze(1)? } else { g };
        Ok(Some(self.dh.broadcast_mul(&g)?))
    }
}

/// Scores of logits [N, vocab] at `temperature` against targets [N]: negative log-likelihoods,
/// their gradient `(softmax - onehot) / temperature` in the logits' dtype and the entropies, as
/// asked.
struct TokenScores {
    nll: Tensor,
    grad: Option<Tensor>,
    entropy: Option<Tensor>,
}

/// `TokenScores` of a chunk, consuming its logits: on the CPU in f32 rows in parallel in one pass,
/// the gradient written over the logits themselves (no second [rows, vocab] buffer: the logits
/// must own their storage, as a fresh product does); tensor ops elsewhere.
fn token_scores(
    logits: Tensor,
    targets: &Tensor,
    temperature: f64,
    want_grad: bool,
    want_entropy: bool,
) -> candle_core::Result<TokenScores> {
    if !(logits.device().is_cpu() && logits.dtype() == DType::F32) {
        return token_scores_tensors(&logits, targets, temperature, want_grad, want_entropy);
    }
    let (n, _) = logits.dims2()?;
    let op = RowScoresCpu {
        targets: targets.to_vec1::<u32>()?,
        s: (1.0 / temperature) as f32,
        want_entropy,
        rows: std::sync::Mutex::new(vec![]),
    };
    let logits = logits.contiguous()?;
    let grad = if want_grad {
        // The logits are this chunk's own (a fresh product): their buffer becomes the gradient.
        logits.inplace_op1(&op)?;
        Some(logits)
    } else {
        let (storage, layout) = logits.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("cross-entropy: CPU logits expected")
        };
        op.score(contiguous_f32(cpu, layout, "cross-entropy")?, layout.dims()[1])?;
        None
    };
    let rows =
        op.rows.into_inner().map_err(|_| candle_core::Error::Msg("cross-entropy: a row task panicked".into()))?;
    let dev = targets.device();
    Ok(TokenScores {
        nll: Tensor::from_vec(rows.iter().map(|r| r.0).collect::<Vec<_>>(), n, dev)?,
        grad,
        entropy: match want_entropy {
            true => Some(Tensor::from_vec(rows.iter().map(|r| r.1).collect::<Vec<_>>(), n, dev)?),
            false => None,
        },
    })
}

/// Scores of CPU f32 logit rows against their targets at scale `s = 1 / temperature`: (nll, entropy)
/// per row into `rows`; as an in-place op, each row then turned into its gradient.
struct RowScoresCpu {
    targets: Vec<u32>,
    s: f32,
    want_entropy: bool,
    rows: std::sync::Mutex<Vec<(f32, f32)>>,
}

impl RowScoresCpu {
    /// Scores of the rows of `logits` (`vocab` wide), which stay as they are.
    fn score(&self, logits: &[f32], vocab: usize) -> candle_core::Result<()> {
        use rayon::prelude::*;
        self.check(logits.len(), vocab)?;
        let rows = logits
            .par_chunks(vocab)
            .zip(&self.targets)
            .map(|(row, &t)| {
                let m = softmax::max_scaled(row, self.s);
                let (sum, wsum) = softmax::exp_sums(row, self.s, m, None, self.want_entropy);
                self.row(m, sum, wsum, row[t as usize] * self.s)
            })
            .collect();
        self.keep(rows)
    }

    /// Scores of the rows of `buf` (`vocab` wide), each row then turned into its gradient
    /// `(softmax - onehot) s`.
    fn score_in_place(&self, buf: &mut [f32], vocab: usize) -> candle_core::Result<()> {
        use rayon::prelude::*;
        self.check(buf.len(), vocab)?;
        let rows = buf
            .par_chunks_mut(vocab)
            .zip(&self.targets)
            .map(|(row, &t)| {
                let (s, t) = (self.s, t as usize);
                let (m, zt) = (softmax::max_scaled(row, s), row[t] * s);
                let (sum, wsum) = softmax::exp_sums_in_place(row, s, m, self.want_entropy);
                // exp(z - m) / sum = softmax; minus the one-hot; times the scale.
                let r = s / sum;
                row.iter_mut().for_each(|dj| *dj *= r);
                row[t] -= s;
                self.row(m, sum, wsum, zt)
            })
            .collect();
        self.keep(rows)
    }

    fn check(&self, len: usize, vocab: usize) -> candle_core::Result<()> {
        if len != self.targets.len() * vocab || self.targets.iter().any(|&t| t as usize >= vocab) {
            candle_core::bail!(
                "cross-entropy: {} targets for {len} logits of a {vocab} vocabulary",
                self.targets.len()
            );
        }
        Ok(())
    }

    /// (nll, entropy) of a row from its max m, sums of exponentials and scaled target logit.
    fn row(&self, m: f32, sum: f32, wsum: f32, zt: f32) -> (f32, f32) {
        let lse = m + sum.ln();
        (lse - zt, if self.want_entropy { lse - wsum / sum } else { 0.0 })
    }

    fn keep(&self, rows: Vec<(f32, f32)>) -> candle_core::Result<()> {
        *self.rows.lock().map_err(|_| candle_core::Error::Msg("cross-entropy: a row task panicked".into()))? = rows;
        Ok(())
    }
}

impl InplaceOp1 for RowScoresCpu {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::F32(v), Some((o1, o2))) = (storage, layout.contiguous_offsets()) else {
            candle_core::bail!("cross-entropy: contiguous f32 logits expected")
        };
        self.score_in_place(&mut v[o1..o2], layout.dims()[1])
    }
}

/// `token_scores` from tensor ops (the GPU, bf16), in f32.
fn token_scores_tensors(
    logits: &Tensor,
    targets: &Tensor,
    temperature: f64,
    want_grad: bool,
    want_entropy: bool,
) -> candle_core::Result<TokenScores> {
    let logp = candle_nn::ops::log_softmax(&(logits.to_dtype(DType::F32)? / temperature)?, D::Minus1)?;
    let idx = targets.unsqueeze(1)?;
    let nll = logp.gather(&idx, 1)?.squeeze(1)?.neg()?;
    let entropy = if want_entropy { Some((logp.exp()? * &logp)?.sum(1)?.neg()?) } else { None };
    let grad = if want_grad {
        let minus_one = Tensor::full(-1f32, (targets.dim(0)?, 1), logits.device())?;
        let d = (logp.exp()?.scatter_add(&idx, &minus_one, 1)? / temperature)?;
        Some(d.to_dtype(logits.dtype())?)
    } else {
        None
    };
    Ok(TokenScores { nll, grad, entropy })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::graph::testing::{max_diff, rand, same_as_graph};
    use candle_core::Device;

    #[test]
    fn linear_cross_entropy_matches_logits_then_log_softmax() {
        let w = rand(&[10, 6], 18);
        let head = Linear::new("lm_head".into(), w.clone(), None);
        let targets = Tensor::new(&[3u32, 0, 9, 4, 9], &Device::Cpu).unwrap();
        let plain = |h: &Tensor| {
            let logp = candle_nn::ops::log_softmax(&h.matmul(&w.t().unwrap()).unwrap(), D::Minus1).unwrap();
            logp.gather(&targets.unsqueeze(1).unwrap(), 1).unwrap().sum_all().unwrap().neg().unwrap()
        };
        // Chunks of 2 rows over 5, the CPU's one-pass rows and the tensor-op form (the GPU's).
        same_as_graph(
            |t| linear_cross_entropy(&t[0], &head, &targets, 2, None).unwrap(),
            |t| plain(&t[0]),
            &[rand(&[5, 6], 19)],
        );
        // Soft-capped logits (Gemma 2), large enough that the cap bites.
        let capped = |h: &Tensor| {
            let z = (h.matmul(&w.t().unwrap()).unwrap() * 3.0).unwrap();
            let c = ((z / 2.0).unwrap().tanh().unwrap() * 2.0).unwrap();
            let logp = candle_nn::ops::log_softmax(&c, D::Minus1).unwrap();
            logp.gather(&targets.unsqueeze(1).unwrap(), 1).unwrap().sum_all().unwrap().neg().unwrap()
        };
        same_as_graph(
            |t| linear_cross_entropy(&(&t[0] * 3.0).unwrap(), &head, &targets, 2, Some(2.0)).unwrap(),
            |t| capped(&t[0]),
            &[rand(&[5, 6], 19)],
        );
        // An NF4 head, dequantised in blocks of rows (2 blocks here), equals its dense dequantisation.
        let (vocab, cols) = (super::super::head_weight::HEAD_ROWS + 4, 64);
        let wq = std::sync::Arc::new(super::super::quant::Nf4Weight::quantize(
            &rand(&[vocab, cols], 21).flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vocab,
            cols,
        ));
        let nf4_head = Linear::quantised("lm_head".into(), Weight::Nf4 { cpu: wq.clone(), gpu: None }, &Device::Cpu);
        let dense_head = Linear::new("lm_head".into(), wq.dequantize_tensor(&Device::Cpu).unwrap(), None);
        let t2 = Tensor::new(&[4097u32, 3, 4099], &Device::Cpu).unwrap();
        same_as_graph(
            |t| linear_cross_entropy(&t[0], &nf4_head, &t2, 2, None).unwrap(),
            |t| linear_cross_entropy(&t[0], &dense_head, &t2, 2, None).unwrap(),
            &[rand(&[3, cols], 22)],
        );
        let logits = (rand(&[5, 10], 20) * 4.0).unwrap();
        // A copy of its own: the CPU form writes the gradient over the logits it is given.
        let a = token_scores(logits.copy().unwrap(), &targets, 1.0, true, false).unwrap();
        let b = token_scores_tensors(&logits, &targets, 1.0, true, false).unwrap();
        let (sa, sb) = (a.nll.sum_all().unwrap(), b.nll.sum_all().unwrap());
        assert!(max_diff(&sa, &sb) < 1e-4 && max_diff(&a.grad.unwrap(), &b.grad.unwrap()) < 1e-6);
        // Without a gradient the logits are only read, and the scores are the same.
        let c = token_scores(logits.clone(), &targets, 1.0, false, false).unwrap();
        assert!(c.grad.is_none() && max_diff(&c.nll, &a.nll) == 0.0);
    }

    #[test]
    fn per_token_log_probs_at_a_temperature_match_log_softmax_and_its_entropy() {
        let w = rand(&[10, 6], 28);
        let head = Linear::new("lm_head".into(), w.clone(), None);
        let targets = Tensor::new(&[3u32, 0, 9, 4, 9], &Device::Cpu).unwrap();
        let temp = 0.7;
        let logp_of = |h: &Tensor| {
            let z = (h.matmul(&w.t().unwrap()).unwrap() / temp).unwrap();
            candle_nn::ops::log_softmax(&z, D::Minus1).unwrap()
        };
        // Values and per-row gradients, chunks of 2 rows over 5.
        same_as_graph(
            |t| linear_log_probs(&t[0], &head, &targets, temp, 2, false, None).unwrap().0,
            |t| logp_of(&t[0]).gather(&targets.unsqueeze(1).unwrap(), 1).unwrap().squeeze(1).unwrap(),
            &[rand(&[5, 6], 29)],
        );
        let h = rand(&[5, 6], 29);
        let entropy = linear_log_probs(&h, &head, &targets, temp, 2, true, None).unwrap().1.unwrap();
        let lp = logp_of(&h);
        let want = (lp.exp().unwrap() * &lp).unwrap().sum(1).unwrap().neg().unwrap();
        assert!(max_diff(&entropy, &want) < 1e-5, "entropy differs by {}", max_diff(&entropy, &want));
        // The CPU rows and the tensor-op form (the GPU's) agree at a temperature too.
        let logits = (rand(&[5, 10], 30) * 4.0).unwrap();
        let a = token_scores(logits.copy().unwrap(), &targets, temp, true, true).unwrap();
        let b = token_scores_tensors(&logits, &targets, temp, true, true).unwrap();
        assert!(max_diff(&a.nll, &b.nll) < 1e-5 && max_diff(&a.grad.unwrap(), &b.grad.unwrap()) < 1e-6);
        let entropy_a = a.entropy.unwrap();
        assert!(max_diff(&entropy_a, &b.entropy.unwrap()) < 1e-5);
        let c = token_scores(logits, &targets, temp, false, true).unwrap();
        assert!(max_diff(&c.nll, &a.nll) == 0.0 && max_diff(&c.entropy.unwrap(), &entropy_a) == 0.0);
    }
}
