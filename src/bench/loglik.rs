//! Log-likelihood requests: the log-probability of a continuation after a context, and whether
//! greedy decoding would have produced it, tokenised and truncated as lm-evaluation-harness's
//! Hugging Face backend does (trailing spaces of the context moved to the continuation; the pair
//! encoded whole and the context's tokens cut off the front; the last `max_length + 1` tokens
//! kept). Requests that share their context (a document's choices) read it once: contexts that
//! begin alike (few-shot examples) are read as their common prefix and then each its own rest into
//! a KV cache, and all continuations after them in one more forward; the rest are scored many to a
//! packed forward.

use crate::pack::rows::PackedRow;
use crate::tokenize::TokenizerInfo;
use crate::train::model::batch::Batch;
use crate::train::model::score::target_scores_of;
use crate::train::model::Model;
use anyhow::{anyhow, Result};
use indicatif::ProgressBar;
use rayon::prelude::*;
use std::collections::HashMap;

/// One (context, continuation) pair in tokens.
#[derive(Debug, Clone)]
pub struct Request {
    pub context: Vec<u32>,
    pub continuation: Vec<u32>,
}

/// What a request scores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub loglik: f64,
    /// Every continuation token is the model's most likely next token.
    pub greedy: bool,
}

/// Tokenises (context, continuation) pairs as lm-eval's `_encode_pair`; an empty context is the
/// `prefix` token alone.
pub fn encode_pairs(tok: &TokenizerInfo, pairs: &[(String, String)], prefix: u32) -> Result<Vec<Request>> {
    let encode = |s: &str| -> Result<Vec<u32>> {
        Ok(tok.tokenizer.encode(s, true).map_err(|e| anyhow!("tokenize: {e}"))?.get_ids().to_vec())
    };
    pairs
        .par_iter()
        .map(|(context, continuation)| {
            if context.is_empty() {
                return Ok(Request { context: vec![prefix], continuation: encode(continuation)? });
            }
            let kept = context.trim_end();
            let (context, continuation) = (kept, format!("{}{continuation}", &context[kept.len()..]));
            let whole = encode(&format!("{context}{continuation}"))?;
            let context = encode(context)?;
            let cut = context.len().min(whole.len());
            Ok(Request { continuation: whole[cut..].to_vec(), context })
        })
        .collect()
}

/// Key/value cache slots (rows x positions) of one shared-context batch: about 750 MB at
/// SmolLM2's shapes.
const CACHE_SLOTS: usize = 16_384;

/// Positions whose logits are computed at once (each row a vocabulary of f32).
const LOGIT_ROWS: usize = 1024;

/// Scores every request: those sharing a context through one prefill of it ([`score_shared`]), the
/// others packed ([`score_packed`]).
pub fn score(
    model: &Model,
    requests: &[Request],
    max_length: usize,
    batch_tokens: usize,
    bar: &ProgressBar,
) -> Result<Vec<Scored>> {
    let mut by_context: HashMap<&[u32], Vec<usize>> = HashMap::new();
    for (i, r) in requests.iter().enumerate() {
        by_context.entry(r.context.as_slice()).or_default().push(i);
    }
    let fits = |i: &usize| requests[*i].context.len() + requests[*i].continuation.len() <= max_length + 1;
    let (mut shared, mut single): (Vec<Vec<usize>>, Vec<usize>) = (vec![], vec![]);
    for members in by_context.into_values() {
        if members.len() > 1 && members.iter().all(fits) {
            shared.push(members);
        } else {
            single.extend(members);
        }
    }
    let mut out = vec![Scored { loglik: 0.0, greedy: true }; requests.len()];
    for (i, s) in score_shared(model, requests, &mut shared, batch_tokens, bar)? {
        out[i] = s;
    }
    single.sort_unstable();
    let singles: Vec<Request> = single.iter().map(|&i| requests[i].clone()).collect();
    for (&i, s) in single.iter().zip(score_packed(model, &singles, max_length, batch_tokens, bar)?) {
        out[i] = s;
    }
    Ok(out)
}

/// Groups of requests with one context each: the contexts prefilled together (longest first,
/// about `batch_tokens` at a time; those that begin alike together, their common start read once),
/// each continuation's first token scored from its context's last logits, the rest read in one
/// forward over the cache.
fn score_shared(
    model: &Model,
    requests: &[Request],
    groups: &mut [Vec<usize>],
    batch_tokens: usize,
    bar: &ProgressBar,
) -> Result<Vec<(usize, Scored)>> {
    let mut out = Vec::new();
    let contexts: Vec<&[u32]> = groups.iter().map(|g| requests[g[0]].context.as_slice()).collect();
    for bucket in prefix_buckets(&contexts) {
        let mut groups: Vec<Vec<usize>> = bucket.iter().map(|&i| groups[i].clone()).collect();
        out.extend(score_contexts(model, requests, &mut groups, batch_tokens, bar)?);
    }
    Ok(out)
}

/// Contexts that begin alike often enough to be read after one prefill of their common start
/// (few-shot examples drawn the same for most documents) in buckets of their own, the rest in one
/// bucket; indices in order.
pub fn prefix_buckets(contexts: &[&[u32]]) -> Vec<Vec<usize>> {
    const KEY: usize = 16;
    const OFTEN: usize = 8;
    let key = |c: &[u32]| -> Vec<u32> { c[..c.len().min(KEY)].to_vec() };
    let mut counts: HashMap<Vec<u32>, usize> = HashMap::new();
    for c in contexts {
        *counts.entry(key(c)).or_default() += 1;
    }
    let mut buckets: Vec<(Option<Vec<u32>>, Vec<usize>)> = vec![];
    for (i, c) in contexts.iter().enumerate() {
        let k = Some(key(c)).filter(|k| counts[k] >= OFTEN);
        match buckets.iter_mut().find(|(b, _)| *b == k) {
            Some((_, v)) => v.push(i),
            None => buckets.push((k, vec![i])),
        }
    }
    buckets.into_iter().map(|(_, v)| v).collect()
}

/// [`score_shared`] within one bucket: contexts batched longest first.
fn score_contexts(
    model: &Model,
    requests: &[Request],
    groups: &mut [Vec<usize>],
    batch_tokens: usize,
    bar: &ProgressBar,
) -> Result<Vec<(usize, Scored)>> {
    groups.sort_by_key(|g| std::cmp::Reverse(requests[g[0]].context.len()));
    let mut out = Vec::new();
    let mut start = 0;
    while start < groups.len() {
        let width = requests[groups[start][0]].context.len();
        let longest = |g: &[usize]| g.iter().map(|&i| requests[i].continuation.len()).max().unwrap_or(0);
        let (mut end, mut tokens, mut rows, mut extra) = (start, 0, 0, 0);
        while end < groups.len() {
            let g = &groups[end];
            let (t, r, e) = (tokens + width, rows + g.len(), extra.max(longest(g)));
            if end > start && (t > batch_tokens || r * (width + e) > CACHE_SLOTS) {
                break;
            }
            (tokens, rows, extra) = (t, r, e);
            end += 1;
        }
        let batch = &groups[start..end];
        let contexts: Vec<&[u32]> = batch.iter().map(|g| requests[g[0]].context.as_slice()).collect();
        // Row b continues context rows_of[b] with request members[b].
        let (mut members, mut rows_of) = (vec![], vec![]);
        for (c, g) in batch.iter().enumerate() {
            for &i in g {
                members.push(i);
                rows_of.push(c);
            }
        }
        let cont = |b: usize| &requests[members[b]].continuation;
        let steps = members.iter().map(|&i| requests[i].continuation.len()).max().unwrap_or(1) - 1;
        // Few-shot contexts begin alike: their common prefix is read once.
        let (logits, mut cache) = model.start(&contexts, &rows_of, steps, true)?;
        let firsts: Vec<u32> = (0..members.len()).map(|b| cont(b)[0]).collect();
        let mut scores: Vec<Vec<(f64, bool)>> =
            target_scores_of(&logits, &firsts)?.into_iter().map(|s| vec![s]).collect();
        if steps > 0 {
            // The rest of every continuation in one forward after its context: the logits after
            // token j score token j + 1.
            let live: Vec<usize> = (0..members.len()).filter(|&b| cont(b).len() > 1).collect();
            if live.len() < members.len() {
                cache.retain(&live)?;
            }
            let fed: Vec<&[u32]> = live.iter().map(|&b| &cont(b)[..cont(b).len() - 1]).collect();
            let h = model.extend_hidden(&fed, &mut cache)?;
            // (row in h, member, its token) of every scored position, in order.
            let mut at: Vec<(u32, usize, u32)> = vec![];
            for &b in &live {
                for &t in &cont(b)[1..] {
                    at.push((at.len() as u32, b, t));
                }
            }
            for part in at.chunks(LOGIT_ROWS) {
                let idx = candle_core::Tensor::from_vec(
                    part.iter().map(|x| x.0).collect::<Vec<_>>(),
                    part.len(),
                    h.device(),
                )?;
                let logits = model.logits_of_hidden(&h.index_select(&idx, 0)?)?;
                let want: Vec<u32> = part.iter().map(|x| x.2).collect();
                for (x, s) in part.iter().zip(target_scores_of(&logits, &want)?) {
                    scores[x.1].push(s);
                }
            }
        }
        for (b, s) in scores.iter().enumerate() {
            out.push((members[b], Scored { loglik: s.iter().map(|x| x.0).sum(), greedy: s.iter().all(|x| x.1) }));
        }
        bar.inc(members.len() as u64);
        start = end;
    }
    Ok(out)
}

/// Scores requests as packed sequences of at most `max_length + 1` tokens (the front cut off),
/// longest first into forwards of about `batch_tokens` tokens.
pub fn score_packed(
    model: &Model,
    requests: &[Request],
    max_length: usize,
    batch_tokens: usize,
    bar: &ProgressBar,
) -> Result<Vec<Scored>> {
    let seqs: Vec<(Vec<u32>, usize)> = requests
        .iter()
        .map(|r| {
            let mut all: Vec<u32> = r.context.iter().chain(&r.continuation).copied().collect();
            if all.len() > max_length + 1 {
                all.drain(..all.len() - (max_length + 1));
            }
            let n = r.continuation.len().min(all.len() - 1);
            (all, n)
        })
        .collect();
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].0.len()));
    let mut out = vec![Scored { loglik: 0.0, greedy: true }; requests.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start;
        let mut tokens = 0;
        while end < order.len() && (end == start || tokens + seqs[order[end]].0.len() <= batch_tokens) {
            tokens += seqs[order[end]].0.len();
            end += 1;
        }
        let group = &order[start..end];
        let mut row = PackedRow { input_ids: vec![], labels: vec![], position_ids: vec![], seq_lengths: vec![] };
        for &i in group {
            let (ids, n) = &seqs[i];
            let at = ids.len() - n;
            row.input_ids.extend(ids.iter().map(|&t| t as i32));
            row.labels.extend(ids.iter().enumerate().map(|(j, &t)| if j >= at { t as i32 } else { -100 }));
            row.position_ids.extend(0..ids.len() as i32);
            row.seq_lengths.push(ids.len() as i32);
        }
        let batch = Batch::from_rows(&[&row], &model.device)?;
        let scores = model.target_scores(&batch)?;
        let mut k = 0;
        for &i in group {
            let n = seqs[i].1;
            let part = &scores[k..k + n];
            out[i] = Scored { loglik: part.iter().map(|s| s.0).sum(), greedy: part.iter().all(|s| s.1) };
            k += n;
        }
        bar.inc(group.len() as u64);
        start = end;
    }
    Ok(out)
}
