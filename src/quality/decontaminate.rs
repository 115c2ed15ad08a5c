//! Decontamination: training rows that share word n-grams (13 by default, as GPT-3's and lighteval's
//! decontamination) with evaluation texts. The evaluation side is indexed once, every n-gram's hash
//! with the evaluation row it first came from, so a training row costs one hash lookup per n-gram.
//! Words are whitespace-separated tokens, lower-cased, with everything but letters and digits taken
//! out ("Two-factor," and "TWOFACTOR" are one word: punctuation, case and spacing do not hide a
//! copy). An evaluation text shorter than 2n words is also indexed by its m-grams, m = max(8, half
//! its words), so that one edited word does not hide a short question (GPT-3's rule alone misses
//! those, and counts only when at least half of the text's m-grams are shared, so a common opening
//! such as "create a story that starts with the line" is no copy); a training row is checked at
//! every length the index holds. A side (prompt or answer) of
//! a training row is contaminated when it shares at least one n-gram and the shared share of its
//! n-grams is at least `min_share`. Texts shorter than 8 words cannot match.

use crate::accounting::RowCtx;
use crate::record::Conversation;
use serde::Serialize;
use std::collections::HashMap;
use xxhash_rust::xxh3::xxh3_64;

/// The evaluation texts' n-grams.
#[derive(Debug)]
pub struct EvalIndex {
    n: usize,
    min_share: f64,
    /// n-gram hash -> the evaluation row it first appeared in, and whether it is a short m-gram.
    grams: HashMap<u64, (u32, bool)>,
    /// Evaluation row -> how many m-grams it was indexed by (short texts only).
    short_grams: HashMap<u32, usize>,
    /// The gram lengths indexed (n, and the shorter ones of short texts).
    lengths: Vec<usize>,
    /// Evaluation row names ("file:row").
    rows: Vec<String>,
}

/// What a contaminated side shares with the evaluation set.
#[derive(Debug, Clone, PartialEq)]
pub struct Overlap {
    /// The evaluation row sharing the most of its n-grams.
    pub eval_row: String,
    /// Shared n-grams, and the side's n-grams in all.
    pub matched: usize,
    pub total: usize,
}

impl Overlap {
    pub fn share(&self) -> f64 {
        self.matched as f64 / self.total.max(1) as f64
    }
}

/// A training row removed as contaminated: a line of contaminated.jsonl.
#[derive(Debug, Clone, Serialize)]
pub struct Contamination {
    pub source: String,
    pub row: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    /// "prompt" or "answer": the side that overlaps.
    pub side: &'static str,
    pub eval_row: String,
    /// Shared word n-grams, the side's n-grams in all, and their share.
    pub matched: usize,
    pub total: usize,
    pub share: f64,
    pub ngram: usize,
    /// The training row as it was mapped.
    pub record: Conversation,
}

/// A [`Contamination`] as read back from a file.
#[derive(serde::Deserialize)]
struct ContaminationRecord {
    source: String,
    row: u64,
    line: Option<u64>,
    side: String,
    eval_row: String,
    matched: usize,
    total: usize,
    share: f64,
    ngram: usize,
    record: Conversation,
}

impl<'de> serde::Deserialize<'de> for Contamination {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Contamination, D::Error> {
        let ContaminationRecord { source, row, line, side, eval_row, matched, total, share, ngram, record } =
            ContaminationRecord::deserialize(d)?;
        let side = crate::accounting::intern(&side);
        Ok(Contamination { source, row, line, side, eval_row, matched, total, share, ngram, record })
    }
}

impl Contamination {
    pub fn new(ctx: &RowCtx, side: &'static str, o: Overlap, ngram: usize, record: Conversation) -> Self {
        Contamination {
            source: ctx.source.to_string(),
            row: ctx.row,
            line: ctx.line,
            side,
            share: o.share(),
            eval_row: o.eval_row,
            matched: o.matched,
            total: o.total,
            ngram,
            record,
        }
    }
}

impl std::fmt::Display for Contamination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} row {}: the {} shares {} of its {} word {}-grams ({:.0}%) with evaluation row {}",
            self.source,
            self.row,
            self.side,
            self.matched,
            self.total,
            self.ngram,
            self.share * 100.0,
            self.eval_row
        )
    }
}

/// Hashes of the text's normalised words.
fn words(text: &str) -> Vec<u64> {
    let mut buf = String::new();
    let mut out = vec![];
    for w in text.split_whitespace() {
        buf.clear();
        buf.extend(w.chars().filter(|c| c.is_alphanumeric()).flat_map(char::to_lowercase));
        if !buf.is_empty() {
            out.push(xxh3_64(buf.as_bytes()));
        }
    }
    out
}

/// Hashes of the word n-grams: an order-sensitive mix of the words' hashes with the length mixed
/// in, so grams of two lengths never collide.
fn grams_of(words: &[u64], n: usize) -> Vec<u64> {
    if words.len() < n {
        return vec![];
    }
    let mix = |g: &[u64]| {
        let h = g.iter().fold(n as u64 ^ 0x243F_6A88_85A3_08D3, |h, &w| {
            (h.rotate_left(23) ^ w).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        });
        h ^ (h >> 29)
    };
    words.windows(n).map(mix).collect()
}

/// The shorter gram length an evaluation text of `len` words is also indexed by, if any.
fn short_len(len: usize, n: usize) -> Option<usize> {
    let m = len.div_ceil(2).max(8);
    (len < 2 * n && m < n && len >= m).then_some(m)
}

impl EvalIndex {
    /// Indexes `(row name, text)` pairs.
    pub fn new(texts: &[(String, String)], n: usize, min_share: f64) -> EvalIndex {
        let (mut grams, mut lengths, mut short_grams) = (HashMap::new(), vec![n], HashMap::new());
        for (i, (_, text)) in texts.iter().enumerate() {
            let w = words(text);
            let short = short_len(w.len(), n);
            for len in std::iter::once(n).chain(short) {
                if !lengths.contains(&len) {
                    lengths.push(len);
                }
                let gs = grams_of(&w, len);
                if len != n {
                    short_grams.insert(i as u32, gs.len());
                }
                for g in gs {
                    grams.entry(g).or_insert((i as u32, len != n));
                }
            }
        }
        let rows = texts.iter().map(|(r, _)| r.clone()).collect();
        EvalIndex { n, min_share, grams, short_grams, lengths, rows }
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// Evaluation rows and their distinct n-grams.
    pub fn size(&self) -> (usize, usize) {
        (self.rows.len(), self.grams.len())
    }

    /// The overlap of `text` with the evaluation set, when it is contaminated.
    pub fn check(&self, text: &str) -> Option<Overlap> {
        let w = words(text);
        // The side's n-grams set the share; a match at any indexed length counts.
        let total = grams_of(&w, self.n).len().max(usize::from(!w.is_empty()));
        let gs: Vec<u64> = self.lengths.iter().flat_map(|&len| grams_of(&w, len)).collect();
        // Per evaluation row: shared n-grams, and shared m-grams of a short text.
        let mut by_row: HashMap<u32, (usize, usize)> = HashMap::new();
        for g in &gs {
            if let Some(&(r, short)) = self.grams.get(g) {
                let e = by_row.entry(r).or_default();
                if short {
                    e.1 += 1;
                } else {
                    e.0 += 1;
                }
            }
        }
        // A shared n-gram counts (GPT-3's rule); a short text counts when most of its m-grams are
        // shared (a template's opening words are not a copy of the question).
        let hit = |r: &u32, &(full, short): &(usize, usize)| {
            full > 0 || 2 * short >= self.short_grams.get(r).copied().unwrap_or(usize::MAX)
        };
        let (&row, &(full, short)) =
            by_row.iter().filter(|(r, c)| hit(r, c)).max_by_key(|(r, c)| (c.0 + c.1, std::cmp::Reverse(**r)))?;
        let matched = (full + short).min(total.max(1));
        if (matched as f64) < self.min_share * total as f64 {
            return None;
        }
        Some(Overlap { eval_row: self.rows[row as usize].clone(), matched, total })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: &str = "Write a function that returns the sum of all even numbers in a list of integers given as input.";

    #[test]
    fn copies_and_light_edits_match_other_text_does_not() {
        let idx = EvalIndex::new(&[("eval.jsonl:7".into(), Q.into())], 13, 0.0);
        // A verbatim copy inside a longer prompt, with other spacing, case and punctuation.
        let hit = idx.check("Please help!  WRITE a function, that returns the sum of all even numbers in a list of integers given as input");
        let o = hit.expect("a copy matches");
        assert_eq!(o.eval_row, "eval.jsonl:7");
        assert!(o.matched >= 5, "{o:?}");
        // One word changed near the end leaves the first 13-grams intact.
        assert!(idx.check(&Q.replace("input", "an argument")).is_some());
        // A short question with a word changed near its end still matches through its 8-grams; a
        // shared opening alone does not.
        let short = "Write a short story that takes place in the city of Paris France.";
        let idx2 = EvalIndex::new(&[("e:2".into(), short.into())], 13, 0.0);
        assert!(idx2.check("Write a short story that takes place in the city of Paris Italy.").is_some());
        assert!(idx2.check("Write a short story that takes place on a ship during a storm at sea.").is_none());
        assert!(idx2.check("WRITE A SHORT STORY THAT TAKES PLACE IN THE CITY OF PARIS FRANCE").is_some());
        // Unrelated text, and text shorter than 13 words, do not match.
        assert!(idx
            .check("Write a poem about the sea in the style of a sailor who has been away for years.")
            .is_none());
        assert!(idx.check("the sum of all even numbers").is_none());
        // A required share: a long answer that quotes a little of the question passes.
        let strict = EvalIndex::new(&[("e:1".into(), Q.into())], 13, 0.5);
        let long =
            format!("{Q} {}", "and then many other words follow here that have nothing to do with it ".repeat(5));
        assert!(strict.check(&long).is_none());
        assert!(strict.check(Q).is_some());
    }
}
