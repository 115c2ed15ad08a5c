//! Decontamination: training rows that share word n-grams (13 by default, as GPT-3's and lighteval's
//! decontamination) with evaluation texts. The evaluation side is indexed once, every n-gram's hash
//! with the evaluation row it first came from, so a training row costs one hash lookup per n-gram.
//! Words are lower-cased runs of letters and digits (punctuation and spacing do not hide a copy).
//! A side (prompt or answer) of a training row is contaminated when it shares at least one n-gram
//! and the shared share of its n-grams is at least `min_share`; texts shorter than n words have no
//! n-gram and cannot match.

use std::collections::HashMap;
use xxhash_rust::xxh3::xxh3_64;

/// The evaluation texts' n-grams.
#[derive(Debug)]
pub struct EvalIndex {
    n: usize,
    min_share: f64,
    /// n-gram hash -> the evaluation row it first appeared in.
    grams: HashMap<u64, u32>,
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

/// Hashes of the text's word n-grams, in order.
fn grams(text: &str, n: usize) -> Vec<u64> {
    let words: Vec<u64> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| xxh3_64(w.to_lowercase().as_bytes()))
        .collect();
    if words.len() < n {
        return vec![];
    }
    words.windows(n).map(|g| xxh3_64(&g.iter().flat_map(|h| h.to_le_bytes()).collect::<Vec<u8>>())).collect()
}

impl EvalIndex {
    /// Indexes `(row name, text)` pairs.
    pub fn new(texts: &[(String, String)], n: usize, min_share: f64) -> EvalIndex {
        let mut grams_of = HashMap::new();
        for (i, (_, text)) in texts.iter().enumerate() {
            for g in grams(text, n) {
                grams_of.entry(g).or_insert(i as u32);
            }
        }
        EvalIndex { n, min_share, grams: grams_of, rows: texts.iter().map(|(r, _)| r.clone()).collect() }
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
        let gs = grams(text, self.n);
        let mut by_row: HashMap<u32, usize> = HashMap::new();
        let mut matched = 0;
        for g in &gs {
            if let Some(&r) = self.grams.get(g) {
                matched += 1;
                *by_row.entry(r).or_default() += 1;
            }
        }
        if matched == 0 || (matched as f64) < self.min_share * gs.len() as f64 {
            return None;
        }
        let (&row, _) = by_row.iter().max_by_key(|(r, c)| (**c, std::cmp::Reverse(**r)))?;
        Some(Overlap { eval_row: self.rows[row as usize].clone(), matched, total: gs.len() })
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
