//! The checks of one token sequence (a packed segment, a preference side, a prompt): how each
//! trained run (an answer) ends, special tokens inside answers, the BOS at the start, and ids the
//! vocabulary does not have. Also the shape of a packed row (lengths, segments, positions).

use super::{Findings, Location, Severity};
use crate::pack::rows::PackedRow;
use crate::tokenize::TokenizerInfo;
use std::collections::{HashMap, HashSet};

/// What the checks need to know of the tokenizer and the template.
#[derive(Debug, Clone, Default)]
pub struct TokenFacts {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
    /// Tokens that end a turn (eos and the end-of-turn markers the vocabulary has).
    pub stops: HashSet<u32>,
    /// Added tokens the tokenizer marks special.
    pub specials: HashSet<u32>,
    /// Token text of the specials, for messages.
    pub names: HashMap<u32, String>,
    /// Ids at or above this are beyond the model's vocabulary.
    pub vocab: usize,
    /// Whether every sequence should start with the BOS (the template writes it or the tokenizer adds it).
    pub bos_expected: bool,
    /// `--loss all` trains prompts too: special tokens inside trained runs are then expected.
    pub trains_prompts: bool,
}

impl TokenFacts {
    /// From the tokenizer, the end-of-turn ids, the template source and the vocabulary to check against.
    pub fn new(tok: &TokenizerInfo, stops: &[u32], template: Option<&str>, vocab: usize) -> TokenFacts {
        let id = |name: &str| tok.special(name).and_then(|t| tok.tokenizer.token_to_id(t));
        let added = tok.tokenizer.get_added_tokens_decoder();
        let specials: HashSet<u32> = added.iter().filter(|(_, t)| t.special).map(|(&i, _)| i).collect();
        let names = added.into_iter().map(|(i, t)| (i, t.content)).collect();
        let bos = id("bos_token");
        TokenFacts {
            bos,
            eos: id("eos_token"),
            pad: id("pad_token"),
            stops: stops.iter().copied().collect(),
            specials,
            names,
            vocab,
            bos_expected: bos.is_some() && (tok.add_bos_token || template.is_some_and(|t| t.contains("bos_token"))),
            trains_prompts: false,
        }
    }

    fn name(&self, id: i32) -> String {
        self.names.get(&(id as u32)).cloned().unwrap_or_else(|| format!("id {id}"))
    }
}

/// Why a packed row does not hold together, if it does not.
pub fn row_shape(r: &PackedRow) -> Result<(), String> {
    let n = r.input_ids.len();
    if r.labels.len() != n || r.position_ids.len() != n {
        return Err(format!(
            "input_ids has {n} tokens, labels {}, position_ids {}",
            r.labels.len(),
            r.position_ids.len()
        ));
    }
    let sum: i64 = r.seq_lengths.iter().map(|&l| l as i64).sum();
    if sum != n as i64 || r.seq_lengths.iter().any(|&l| l <= 0) {
        return Err(format!("seq_lengths {:?} do not add up to the row's {n} tokens", r.seq_lengths));
    }
    let mut at = 0usize;
    for (k, &l) in r.seq_lengths.iter().enumerate() {
        let l = l as usize;
        if r.position_ids[at..at + l].iter().enumerate().any(|(p, &q)| q != p as i32) {
            return Err(format!("position_ids of segment {k} do not count 0, 1, 2, ... from its start"));
        }
        at += l;
    }
    Ok(())
}

/// Checks one sequence; `labels` is empty for prompts. `at` builds a location from a token position.
pub fn check(
    ids: &[i32],
    labels: &[i32],
    f: &TokenFacts,
    truncating: bool,
    at: &dyn Fn(Option<usize>, String) -> Location,
    out: &mut Findings,
) {
    if let Some(p) = ids.iter().position(|&t| t < 0 || t as usize >= f.vocab) {
        let beyond = ids.iter().filter(|&&t| t < 0 || t as usize >= f.vocab).count();
        out.add(
            "id_beyond_vocab",
            Severity::Error,
            "token ids the model's vocabulary does not have (the embedding lookup fails or reads garbage)",
            "prepare the shards with the model's own tokenizer (--tokenizer MODEL_DIR or the GGUF file)",
            Some(at(Some(p), format!("id {} >= vocabulary {} ({beyond} such ids here)", ids[p], f.vocab))),
        );
    }
    if let Some(bos) = f.bos.map(|b| b as i32) {
        if ids.len() >= 2 && ids[0] == bos && ids[1] == bos {
            out.add(
                "bos_doubled",
                Severity::Error,
                "sequences that start with two BOS tokens (the template writes one and the tokenizer adds another)",
                "render without adding special tokens (tunekit's prepare does); remove the second BOS where these shards come from",
                Some(at(Some(0), format!("starts {0} {0}", f.name(bos)))),
            );
        } else if f.bos_expected && ids.first().is_some_and(|&t| t != bos) {
            out.add(
                "bos_missing",
                Severity::Warning,
                "sequences without the BOS token the model's template starts with",
                "prepare with the model's own chat template, which writes the BOS",
                Some(at(Some(0), format!("starts with {} instead of {}", ids[0], f.name(bos)))),
            );
        }
    }
    let trained = |t: usize| labels.get(t).is_some_and(|&l| l != -100);
    let stop = |t: &i32| f.stops.contains(&(*t as u32));
    let mut a = 0usize;
    while a < ids.len() {
        if !trained(a) {
            a += 1;
            continue;
        }
        let mut b = a;
        while b < ids.len() && trained(b) {
            b += 1;
        }
        // A run ends its turn when one of its last two tokens is an end-of-turn token ("<|im_end|>"
        // alone, or followed by the newline some templates train with it).
        let tail = b.saturating_sub(2).max(a);
        if !ids[tail..b].iter().any(stop) {
            let next = &ids[b..(b + 2).min(ids.len())];
            if let Some(k) = next.iter().position(stop) {
                let eot = ids[b + k];
                let pad_note = if f.pad.is_some() && f.pad == f.eos && f.eos == Some(eot as u32) {
                    " (pad_token is this same token: a collator that masks padding by id took it out of the loss)"
                } else {
                    ""
                };
                out.add(
                    "eot_not_trained",
                    Severity::Error,
                    "answers whose end-of-turn token is not trained: the model will not learn to stop",
                    "prepare again with tunekit's --loss assistant (it trains each answer's end-of-turn token); \
                     if pad equals eos, give the tokenizer a distinct pad token",
                    Some(at(
                        Some(b + k),
                        format!("the answer ending at token {b} is followed by an untrained {}{pad_note}", f.name(eot)),
                    )),
                );
            } else if b == ids.len() {
                let (what, fix) = if truncating {
                    (
                        "answers cut off by --too-long truncate: the model learns to stop mid-answer, or not to stop",
                        "raise --seq-len, or prepare with --too-long drop (the default) so such samples are rejected",
                    )
                } else {
                    (
                        "answers that run to the end of the sequence without an end-of-turn token",
                        "check the chat template ends assistant turns with the end-of-turn token",
                    )
                };
                out.add(
                    "answer_cut",
                    Severity::Warning,
                    what,
                    fix,
                    Some(at(
                        Some(b - 1),
                        format!("the trained run from token {a} ends the sequence without an end-of-turn token"),
                    )),
                );
            } else if !f.trains_prompts {
                out.add(
                    "answer_not_closed",
                    Severity::Warning,
                    "answers not followed by an end-of-turn token",
                    "check the chat template ends assistant turns with an end-of-turn token the tokenizer knows",
                    Some(at(Some(b - 1), format!("the trained run {a}..{b} is followed by {}", f.name(ids[b])))),
                );
            }
        }
        if !f.trains_prompts {
            if let Some(p) = (a..tail).find(|&t| f.specials.contains(&(ids[t] as u32)) || stop(&ids[t])) {
                out.add(
                    "special_token_in_answer",
                    Severity::Error,
                    "answers whose text contains a special token's text (the tokenizer turns it into the token, \
                     so the model learns to end turns mid-sentence)",
                    "remove or escape special-token text in the data (e.g. with a --sql filter or by editing the rows), \
                     or drop such rows",
                    Some(at(Some(p), format!("{} inside the answer at tokens {a}..{b}", f.name(ids[p])))),
                );
            }
        }
        a = b;
    }
}
