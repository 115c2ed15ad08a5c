//! Deduplication: exact (a 128-bit hash of the normalised text) and near (MinHash over word
//! n-gram shingles, LSH banding for candidates, then a check of the Jaccard similarity against the
//! threshold, from bottom-k sketches, so banding false positives are not removed).
//!
//! Streaming and deterministic: rows are decided in input order and the first one of a cluster is
//! kept. Every row's signature stays in the LSH index (kept or not), so clusters are transitive: if
//! A~B and B~C, C is removed as a duplicate of A even when A and C are not similar themselves.
//! Memory is proportional to the number of rows (ids, band keys, sketches of at most
//! `sketch_size` hashes), not to the text.

pub mod minhash;
pub mod normalize;
pub mod run;

use crate::record::Conversation;
use minhash::{bottom_k, jaccard_bottom_k, MinHasher, Signature};
use normalize::Normalization;
use rayon::prelude::*;
use serde::Serialize;
use std::collections::HashMap;
use xxhash_rust::xxh3::xxh3_64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupMode {
    /// Exact and near duplicates (MinHash-LSH).
    Near,
    /// Exact duplicates of the normalised text only.
    Exact,
    /// Keep everything.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupKey {
    /// The whole conversation, roles included.
    Conversation,
    /// System and user messages only.
    Prompt,
    /// Assistant messages only.
    Completion,
}

#[derive(Debug, Clone, Serialize)]
pub struct DedupOptions {
    pub mode: DedupMode,
    pub key: DedupKey,
    pub threshold: f64,
    pub ngram: usize,
    pub num_perm: usize,
    pub bands: usize,
    /// Shingle hashes kept per row for the similarity check (exact Jaccard up to this many shingles).
    pub sketch_size: usize,
    pub normalization: Normalization,
    pub seed: u64,
}

impl Default for DedupOptions {
    fn default() -> Self {
        DedupOptions {
            mode: DedupMode::Near,
            key: DedupKey::Conversation,
            threshold: 0.8,
            ngram: 5,
            num_perm: 128,
            bands: 32,
            sketch_size: 256,
            normalization: Normalization::default(),
            seed: 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DupKind {
    Exact,
    Near,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Keep,
    Duplicate { of: String, kind: DupKind, similarity: f64 },
}

/// One line of duplicates.jsonl.
#[derive(Debug, Serialize)]
pub struct DuplicateRecord<'a> {
    pub id: &'a str,
    pub duplicate_of: &'a str,
    pub kind: DupKind,
    pub similarity: f64,
}

pub struct Deduper {
    opts: DedupOptions,
    hasher: MinHasher,
    exact: HashMap<u128, u32>,
    ids: Vec<String>,
    /// Representative (kept row) of each row's cluster.
    rep: Vec<u32>,
    sketches: Vec<Box<[u32]>>,
    tables: Vec<HashMap<u64, Vec<u32>>>,
}

impl Deduper {
    pub fn new(opts: DedupOptions) -> Self {
        assert!(opts.bands > 0 && opts.num_perm % opts.bands == 0, "num_perm must be a multiple of bands");
        let hasher = MinHasher::new(opts.num_perm, opts.ngram, opts.seed);
        let tables = (0..opts.bands).map(|_| HashMap::new()).collect();
        Deduper { opts, hasher, exact: HashMap::new(), ids: Vec::new(), rep: Vec::new(), sketches: Vec::new(), tables }
    }

    pub fn options(&self) -> &DedupOptions {
        &self.opts
    }

    fn key_text(&self, c: &Conversation) -> String {
        match self.opts.key {
            DedupKey::Conversation => c.full_text(),
            DedupKey::Prompt => c.prompt_text(),
            DedupKey::Completion => c.completion_text(),
        }
    }

    /// Decides a batch, in order. Signatures are computed in parallel.
    pub fn process(&mut self, batch: &[Conversation]) -> Vec<Verdict> {
        if self.opts.mode == DedupMode::None {
            return vec![Verdict::Keep; batch.len()];
        }
        let near = self.opts.mode == DedupMode::Near;
        let prepared: Vec<(u128, Option<(Signature, Vec<u32>)>)> = batch
            .par_iter()
            .map(|c| {
                let text = self.key_text(c);
                let exact_norm = self.opts.normalization.apply(&text);
                let h = xxhash_rust::xxh3::xxh3_128(exact_norm.as_bytes());
                let sig = near.then(|| {
                    let sh = self.hasher.shingles(&normalize::words_for_shingles(&text));
                    (self.hasher.signature(&sh), bottom_k(&sh, self.opts.sketch_size))
                });
                (h, sig)
            })
            .collect();
        batch.iter().zip(prepared).map(|(c, (h, sig))| self.decide(&c.id, h, sig)).collect()
    }

    fn decide(&mut self, id: &str, h: u128, sig: Option<(Signature, Vec<u32>)>) -> Verdict {
        if let Some(&seen) = self.exact.get(&h) {
            let r = self.rep[seen as usize];
            return Verdict::Duplicate { of: self.ids[r as usize].clone(), kind: DupKind::Exact, similarity: 1.0 };
        }
        let me = self.ids.len() as u32;
        self.ids.push(id.to_string());
        self.exact.insert(h, me);
        let Some((sig, sketch)) = sig else {
            self.rep.push(me);
            return Verdict::Keep;
        };
        let rows = self.opts.num_perm / self.opts.bands;
        let band_keys: Vec<u64> = (0..self.opts.bands)
            .map(|b| {
                let slice = &sig[b * rows..(b + 1) * rows];
                let bytes: Vec<u8> = slice.iter().flat_map(|v| v.to_le_bytes()).collect();
                xxh3_64(&bytes) ^ (b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            })
            .collect();
        // Best candidate above the threshold.
        let mut best: Option<(u32, f64)> = None;
        let mut checked: Vec<u32> = Vec::new();
        for (b, key) in band_keys.iter().enumerate() {
            if let Some(cands) = self.tables[b].get(key) {
                for &c in cands {
                    if checked.contains(&c) {
                        continue;
                    }
                    checked.push(c);
                    let sim = jaccard_bottom_k(&sketch, &self.sketches[c as usize], self.opts.sketch_size);
                    if sim >= self.opts.threshold && best.is_none_or(|(_, s)| sim > s) {
                        best = Some((c, sim));
                    }
                }
            }
        }
        // Index this row (even as a duplicate) so clusters chain transitively.
        for (b, key) in band_keys.into_iter().enumerate() {
            self.tables[b].entry(key).or_default().push(me);
        }
        self.sketches.push(sketch.into_boxed_slice());
        match best {
            Some((c, sim)) => {
                let r = self.rep[c as usize];
                self.rep.push(r);
                Verdict::Duplicate { of: self.ids[r as usize].clone(), kind: DupKind::Near, similarity: sim }
            }
            None => {
                self.rep.push(me);
                Verdict::Keep
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Message;

    fn conv(id: &str, q: &str, a: &str) -> Conversation {
        Conversation::new(id.into(), vec![Message::new("user", q), Message::new("assistant", a)])
    }

    const TEXT: &str = "The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden \
        porch and drinks a cup of strong black coffee before the long day of work in the fields begins again. \
        Later the children walk to the small school by the river, where the teacher reads them old stories about \
        sailors, mountains, kings and clever animals, and in the evening everyone gathers around the table to eat \
        bread, soup and apples from the orchard while the radio plays quiet music until the lamps are turned off";

    #[test]
    fn exact_after_normalisation_and_near_with_transitivity() {
        let mut d = Deduper::new(DedupOptions::default());
        let a = conv("a", "Tell me a story", TEXT);
        let b = conv("b", "tell  me a STORY", TEXT); // exact after normalisation
        let c = conv("c", "Tell me a story", &TEXT.replace("lazy", "sleepy"));
        let e = conv("e", "Tell me a story", &TEXT.replace("lazy", "sleepy").replace("strong", "hot"));
        let u = conv("u", "Something else", "An unrelated answer about databases and indexes.");
        let v = d.process(&[a, b, c, e, u]);
        assert_eq!(v[0], Verdict::Keep);
        assert!(matches!(&v[1], Verdict::Duplicate { of, kind: DupKind::Exact, .. } if of == "a"));
        assert!(matches!(&v[2], Verdict::Duplicate { of, kind: DupKind::Near, .. } if of == "a"));
        assert!(matches!(&v[3], Verdict::Duplicate { of, kind: DupKind::Near, .. } if of == "a"));
        assert_eq!(v[4], Verdict::Keep);
    }

    #[test]
    fn none_keeps_everything() {
        let mut d = Deduper::new(DedupOptions { mode: DedupMode::None, ..Default::default() });
        let v = d.process(&[conv("a", "x", "y"), conv("b", "x", "y")]);
        assert_eq!(v, vec![Verdict::Keep, Verdict::Keep]);
    }
}
