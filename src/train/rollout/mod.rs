//! The rollout engine: many completions of many prompts, sampled from the model as it is (the policy
//! that trains is the one that samples; no second engine, no weight sync). The prompts are prefilled
//! once as one packed batch, each prompt's keys and values copied to the rows that continue it, then
//! one forward over all live rows per token ([`crate::train::model::kv_cache`]). Each row draws from
//! its own candle-transformers `LogitsProcessor` seeded by the caller, so a completion depends only
//! on its seed and the model, not on the batch it was sampled in (resumable, reproducible).
//! [`chat`] is the one-answer use of it behind `tunekit generate`.

pub mod chat;

use crate::train::model::Model;
use anyhow::Result;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// How tokens are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f64,
    /// Nucleus sampling: the smallest set of tokens whose probability reaches this (1 = off).
    pub top_p: f64,
    /// Only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Longest completion; a completion that reaches it without a stop token is truncated.
    pub max_new_tokens: usize,
}

impl SamplingParams {
    fn sampling(&self) -> Sampling {
        let temperature = self.temperature;
        let top_p = self.top_p < 1.0;
        match (temperature <= 0.0, self.top_k > 0, top_p) {
            (true, _, _) => Sampling::ArgMax,
            (false, true, true) => Sampling::TopKThenTopP { k: self.top_k, p: self.top_p, temperature },
            (false, true, false) => Sampling::TopK { k: self.top_k, temperature },
            (false, false, true) => Sampling::TopP { p: self.top_p, temperature },
            (false, false, false) => Sampling::All { temperature },
        }
    }
}

/// One sampled continuation: its tokens (the stop token included when it ended at one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    pub tokens: Vec<u32>,
    /// Ended at a stop token; false when it reached `max_new_tokens` first (truncated).
    pub finished: bool,
}

/// Completions of `prompts`: row `b` continues prompt `rows[b]` with the sampler seeded `seeds[b]`,
/// stopping at any of `stops`. Returns one completion per row.
pub fn complete(
    model: &Model,
    prompts: &[&[u32]],
    rows: &[usize],
    seeds: &[u64],
    params: &SamplingParams,
    stops: &[u32],
) -> Result<Vec<Completion>> {
    complete_until(model, prompts, rows, seeds, params, stops, &|_, _| false, false)
}

/// [`complete`], a row also ending (finished) as soon as `done(row, its tokens so far)` says so
/// (a stop string in the decoded text, for evaluation); with `share_prefix`, prompts that begin
/// alike read their common start once ([`Model::start`]).
#[allow(clippy::too_many_arguments)]
pub fn complete_until(
    model: &Model,
    prompts: &[&[u32]],
    rows: &[usize],
    seeds: &[u64],
    params: &SamplingParams,
    stops: &[u32],
    done: &(dyn Fn(usize, &[u32]) -> bool + Sync),
    share_prefix: bool,
) -> Result<Vec<Completion>> {
    assert_eq!(rows.len(), seeds.len(), "one seed per row");
    let mut out: Vec<Completion> = rows.iter().map(|_| Completion { tokens: vec![], finished: false }).collect();
    if rows.is_empty() || params.max_new_tokens == 0 {
        return Ok(out);
    }
    let (mut logits, mut cache) = model.start(prompts, rows, params.max_new_tokens, share_prefix)?;
    let mut samplers: Vec<LogitsProcessor> =
        seeds.iter().map(|&s| LogitsProcessor::from_sampling(s, params.sampling())).collect();
    // Live rows, by their index in `out`; the cache holds them in this order.
    let mut live: Vec<usize> = (0..rows.len()).collect();
    loop {
        // Each live row draws from its own sampler, the rows in parallel.
        let rows_logits: Vec<candle_core::Tensor> =
            (0..live.len()).map(|i| logits.get(i)).collect::<candle_core::Result<_>>()?;
        let mut mine: Vec<(usize, &mut LogitsProcessor)> =
            samplers.iter_mut().enumerate().filter(|(r, _)| live.binary_search(r).is_ok()).collect();
        let drawn: Vec<u32> = mine
            .par_iter_mut()
            .zip(rows_logits.par_iter())
            .map(|((_, s), l)| s.sample(l))
            .collect::<candle_core::Result<_>>()?;
        let mut next = Vec::with_capacity(live.len());
        let mut keep = Vec::with_capacity(live.len());
        for (i, (&r, &t)) in live.iter().zip(&drawn).enumerate() {
            let c = &mut out[r];
            c.tokens.push(t);
            if stops.contains(&t) || done(r, &c.tokens) {
                c.finished = true;
            } else if c.tokens.len() < params.max_new_tokens {
                keep.push(i);
                next.push(t);
            }
        }
        if keep.is_empty() {
            return Ok(out);
        }
        if keep.len() < live.len() {
            cache.retain(&keep)?;
            live = keep.iter().map(|&i| live[i]).collect();
        }
        logits = model.decode(&next, &mut cache)?;
    }
}
