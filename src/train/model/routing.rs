//! What the routers of a mixture of experts did in one forward: per sparse layer a [`Routing`]
//! record (tokens per expert, the router's probabilities summed over tokens), from which come the
//! auxiliary load-balancing loss ([`aux_loss`], transformers' `load_balancing_loss_func`) and the
//! expert load of the metrics ([`ExpertLoad`]).

use candle_core::{DType, Tensor};

/// One sparse layer's routing in one forward.
#[derive(Clone)]
pub struct Routing {
    /// Tokens sent to each expert (each token counts once for each of its top-k experts).
    pub counts: Vec<u32>,
    pub tokens: usize,
    /// The router's softmax summed over the tokens [E], in the graph.
    pub prob_sum: Tensor,
}

/// Switch Transformer's load-balancing loss as transformers computes it over a forward's sparse
/// layers, pooled: with C_e the tokens routed to expert e and P_e its summed probability, both over
/// every layer, and N = layers x tokens, `E * sum_e (C_e / N) (P_e / N)`. Top-k choice counts carry
/// no gradient; the probabilities do. None without records.
pub fn aux_loss(records: &[Routing]) -> candle_core::Result<Option<Tensor>> {
    let Some(w) = balance_weights(records)? else { return Ok(None) };
    let mut total: Option<Tensor> = None;
    for r in records {
        let term = layer_term(r, &w)?;
        total = Some(match total {
            Some(t) => (t + term)?,
            None => term,
        });
    }
    Ok(total)
}

/// The pooled loss's per-expert weights `E * C_e / N^2` [E] (constants: the top-k choice carries
/// no gradient), so that the loss is the sum over layers of [`layer_term`]. None without tokens.
pub fn balance_weights(records: &[Routing]) -> candle_core::Result<Option<Tensor>> {
    balance_weights_of(&records.iter().collect::<Vec<_>>())
}

/// [`balance_weights`] of borrowed records.
pub fn balance_weights_of(records: &[&Routing]) -> candle_core::Result<Option<Tensor>> {
    let Some(first) = records.first() else { return Ok(None) };
    let e = first.counts.len();
    let n: f64 = records.iter().map(|r| r.tokens as f64).sum();
    if n == 0.0 {
        return Ok(None);
    }
    let mut c = vec![0f64; e];
    for r in records {
        r.counts.iter().zip(&mut c).for_each(|(&x, s)| *s += x as f64);
    }
    let w: Vec<f32> = c.iter().map(|&x| (e as f64 * x / (n * n)) as f32).collect();
    Ok(Some(Tensor::from_vec(w, e, first.prob_sum.device())?))
}

/// One layer's part of the pooled loss: its summed probabilities weighted by [`balance_weights`].
pub fn layer_term(r: &Routing, weights: &Tensor) -> candle_core::Result<Tensor> {
    (r.prob_sum.to_dtype(DType::F32)? * weights)?.sum_all()
}

/// Tokens per expert per sparse layer, summed over micro-batches and steps until taken.
#[derive(Debug, Default, Clone)]
pub struct ExpertLoad {
    /// (layer, tokens, tokens per expert).
    pub layers: Vec<(usize, u64, Vec<u64>)>,
    pub top_k: usize,
}

impl ExpertLoad {
    pub fn add(&mut self, layer: usize, r: &Routing) {
        let i = match self.layers.iter().position(|l| l.0 == layer) {
            Some(i) => i,
            None => {
                self.layers.push((layer, 0, vec![0; r.counts.len()]));
                self.layers.len() - 1
            }
        };
        let l = &mut self.layers[i];
        l.1 += r.tokens as u64;
        l.2.iter_mut().zip(&r.counts).for_each(|(s, &c)| *s += c as u64);
    }

    /// Each layer's share of tokens per expert (a token counts for each of its k experts, so the
    /// shares sum to k).
    pub fn shares(&self) -> Vec<(usize, Vec<f64>)> {
        self.layers.iter().map(|(l, t, c)| (*l, c.iter().map(|&x| x as f64 / (*t).max(1) as f64).collect())).collect()
    }

    /// Each layer's imbalance: its busiest expert's share over the balanced share k/E (1: even;
    /// E/k: every token sent to that expert).
    pub fn imbalance(&self) -> Vec<(usize, f64)> {
        self.shares()
            .into_iter()
            .map(|(l, s)| {
                let even = self.top_k as f64 / s.len().max(1) as f64;
                (l, s.iter().cloned().fold(0.0, f64::max) / even)
            })
            .collect()
    }

    /// The layers whose router sent at least 90% of the tokens to one expert (with more experts
    /// than each token uses): (layer, expert, share).
    pub fn collapsed(&self) -> Vec<(usize, usize, f64)> {
        self.shares()
            .into_iter()
            .filter(|(_, s)| s.len() > self.top_k)
            .filter_map(|(l, s)| {
                let (e, &m) = s.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))?;
                (m >= 0.9).then_some((l, e, m))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn record(counts: Vec<u32>, tokens: usize, probs: &[f32]) -> Routing {
        Routing { counts, tokens, prob_sum: Tensor::new(probs, &Device::Cpu).unwrap() }
    }

    #[test]
    fn the_aux_loss_pools_counts_and_probabilities_over_layers() {
        // Two layers of 2 tokens, 2 experts, top-1.
        let r = [record(vec![2, 0], 2, &[1.5, 0.5]), record(vec![1, 1], 2, &[1.0, 1.0])];
        let got = aux_loss(&r).unwrap().unwrap().to_scalar::<f32>().unwrap();
        // C = [3, 1], P = [2.5, 1.5], N = 4: 2 * (3/4 * 2.5/4 + 1/4 * 1.5/4) = 1.125
        assert!((got - 1.125).abs() < 1e-6, "{got}");
        assert!(aux_loss(&[]).unwrap().is_none());
    }

    #[test]
    fn a_router_sending_every_token_to_one_expert_is_reported() {
        let mut load = ExpertLoad { top_k: 2, ..Default::default() };
        load.add(0, &record(vec![10, 10, 0, 0], 10, &[0.0; 4]));
        load.add(1, &record(vec![5, 5, 5, 5], 10, &[0.0; 4]));
        assert_eq!(load.imbalance(), vec![(0, 2.0), (1, 1.0)]);
        assert_eq!(load.collapsed(), vec![(0, 0, 1.0)]);
    }
}
