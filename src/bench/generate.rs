//! Generation requests: answers to contexts, greedy (or sampled with a seed per document), stopped at
//! an end-of-sequence token or as soon as the text holds one of the task's `until` strings, and cut
//! there, as lm-evaluation-harness's Hugging Face backend returns them. Contexts are left-truncated
//! to leave `max_gen_toks` of room; prompts go through the rollout engine's KV cache a batch at a
//! time, those that begin alike (few-shot examples) together, their common start read once.

use super::loglik::prefix_buckets;
use super::task::Generation;
use crate::tokenize::TokenizerInfo;
use crate::train::model::Model;
use crate::train::rollout::{complete_until, SamplingParams};
use anyhow::{anyhow, Result};
use indicatif::ProgressBar;

/// Answers generated together (each keeps its own KV cache row).
const BATCH: usize = 64;

/// The answers to `contexts`, `repeats` per context one after the other (each with its own seed),
/// each cut at the first `until` string.
pub fn answers(
    model: &Model,
    tok: &TokenizerInfo,
    contexts: &[Vec<u32>],
    repeats: usize,
    g: &Generation,
    seed: u64,
    bar: &ProgressBar,
) -> Result<Vec<String>> {
    let params = SamplingParams {
        temperature: if g.do_sample { g.temperature } else { 0.0 },
        top_p: g.top_p,
        top_k: g.top_k,
        max_new_tokens: g.max_gen_toks,
    };
    let stops = tok.stop_ids();
    let decode = |t: &[u32]| -> Result<String> { tok.tokenizer.decode(t, true).map_err(|e| anyhow!("decode: {e}")) };
    let until: Vec<&str> = g.until.iter().map(String::as_str).filter(|s| !s.is_empty()).collect();
    let done = |_: usize, t: &[u32]| -> bool {
        !until.is_empty() && decode(t).is_ok_and(|s| until.iter().any(|u| s.contains(u)))
    };
    let refs: Vec<&[u32]> = contexts.iter().map(Vec::as_slice).collect();
    let mut out = vec![String::new(); contexts.len() * repeats];
    // Prompts that begin alike go together (their common start read once); answer a of prompt p
    // is out[p * repeats + a], sampled with the seed of that place.
    for bucket in prefix_buckets(&refs) {
        for chunk in bucket.chunks(BATCH.div_ceil(repeats)) {
            let prompts: Vec<&[u32]> = chunk.iter().map(|&p| refs[p]).collect();
            let rows: Vec<usize> = (0..chunk.len()).flat_map(|r| std::iter::repeat_n(r, repeats)).collect();
            let places: Vec<usize> = chunk.iter().flat_map(|&p| (0..repeats).map(move |a| p * repeats + a)).collect();
            let seeds: Vec<u64> = places.iter().map(|&k| seed.wrapping_add(k as u64)).collect();
            let completions = complete_until(model, &prompts, &rows, &seeds, &params, &stops, &done, true)?;
            for (c, &k) in completions.iter().zip(&places) {
                out[k] = cut_at(&decode(&c.tokens)?, &until);
            }
            bar.inc(places.len() as u64);
        }
    }
    Ok(out)
}

/// The text before the first occurrence of each stop string in turn (lm-eval's
/// `postprocess_generated_text`).
pub fn cut_at(text: &str, until: &[&str]) -> String {
    let mut s = text;
    for u in until {
        if let Some(i) = s.find(u) {
            s = &s[..i];
        }
    }
    s.to_string()
}
