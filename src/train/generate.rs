//! `tunekit generate`: render the chat template, then sample with a KV cache (greedy,
//! temperature, top-p), stopping at end-of-turn or end-of-sequence tokens.

use super::model::kv_cache::KvCache;
use super::model::Model;
use crate::record::Message;
use crate::split::SplitMix64;
use crate::template::chat::ChatTemplate;
use crate::tokenize::TokenizerInfo;
use anyhow::{Context, Result};
use candle_core::D;

pub struct Sampling {
    pub max_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
}

/// Token ids that end a turn: the eos token, and end-of-turn markers the vocabulary has.
pub fn stop_ids(tok: &TokenizerInfo) -> Vec<u32> {
    let mut names: Vec<String> = ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if let Some(e) = tok.special("eos_token") {
        names.push(e.to_string());
    }
    let mut ids: Vec<u32> = names.iter().filter_map(|n| tok.tokenizer.token_to_id(n)).collect();
    ids.sort();
    ids.dedup();
    ids
}

pub fn generate(
    model: &Model,
    tok: &TokenizerInfo,
    tpl: &ChatTemplate,
    messages: &[Message],
    s: &Sampling,
) -> Result<String> {
    let prompt = tpl.render(messages, None, true).map_err(|e| anyhow::anyhow!("chat template: {e:#}"))?;
    let ids =
        tok.tokenizer.encode(prompt.as_str(), false).map_err(|e| anyhow::anyhow!("tokenize: {e}"))?.get_ids().to_vec();
    let stops = stop_ids(tok);
    let mut cache = KvCache::default();
    let mut rng = SplitMix64::new(s.seed);
    let mut logits = model.step(&ids, &mut cache)?;
    let mut out: Vec<u32> = Vec::new();
    for _ in 0..s.max_tokens {
        let next = sample(&logits, s, &mut rng)?;
        if stops.contains(&next) {
            break;
        }
        out.push(next);
        logits = model.step(&[next], &mut cache)?;
    }
    tok.tokenizer.decode(&out, true).map_err(|e| anyhow::anyhow!("decode: {e}"))
}

fn sample(logits: &candle_core::Tensor, s: &Sampling, rng: &mut SplitMix64) -> Result<u32> {
    if s.temperature <= 0.0 {
        return Ok(logits.argmax(D::Minus1)?.to_scalar::<u32>()?);
    }
    let l: Vec<f32> = (logits / s.temperature)?.to_vec1()?;
    let max = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut p: Vec<(usize, f64)> = l.iter().enumerate().map(|(i, &x)| (i, ((x - max) as f64).exp())).collect();
    let z: f64 = p.iter().map(|x| x.1).sum();
    p.iter_mut().for_each(|x| x.1 /= z);
    p.sort_by(|a, b| b.1.partial_cmp(&a.1).expect("finite"));
    let mut kept = Vec::new();
    let mut cum = 0.0;
    for (i, q) in p {
        kept.push((i, q));
        cum += q;
        if cum >= s.top_p {
            break;
        }
    }
    let r = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * cum;
    let mut acc = 0.0;
    for (i, q) in &kept {
        acc += q;
        if acc >= r {
            return Ok(*i as u32);
        }
    }
    kept.last().map(|x| x.0 as u32).context("empty distribution")
}
