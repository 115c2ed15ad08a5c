//! Deduplication: exact (a 128-bit hash of the normalised text) and near (MinHash over word
//! n-gram shingles, LSH banding for candidates, then a check of the Jaccard similarity against the
//! threshold, from bottom-k sketches, so banding false positives are not removed).
//!
//! Streaming and deterministic: rows are decided in input order and the first one of a cluster is
//! kept. Every row's signature stays in the LSH index (kept or not), so clusters are transitive: if
//! A~B and B~C, C is removed as a duplicate of A even when A and C are not similar themselves.
//! Memory is proportional to the number of rows (ids, band keys, sketches of at most
//! `sketch_size` hashes), not to the text. [`longest`] keeps each cluster's longest row instead
//! of its first (`dedup --keep longest`, two passes).

pub mod longest;
pub mod minhash;
pub mod normalize;

use crate::record::Conversation;
use minhash::{bottom_k, jaccard_bottom_k, MinHasher, Signature};
use normalize::Normalization;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use xxhash_rust::xxh3::xxh3_64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupMode {
    /// Exact and near duplicates (MinHash-LSH).
    Near,
    /// Exact duplicates of the normalised text only.
    Exact,
    /// Keep everything.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupKey {
    /// The whole conversation, roles included.
    Conversation,
    /// System and user messages only.
    Prompt,
    /// Assistant messages only.
    Completion,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
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
            num_perm: 126,
            bands: 21,
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

/// Row ids stored back to back (one allocation instead of one per row).
#[derive(Default)]
struct Ids {
    buf: String,
    ends: Vec<usize>,
}

impl Ids {
    fn push(&mut self, id: &str) -> u32 {
        self.buf.push_str(id);
        self.ends.push(self.buf.len());
        (self.ends.len() - 1) as u32
    }
    fn get(&self, i: u32) -> &str {
        let i = i as usize;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.buf[start..self.ends[i]]
    }
}

const NONE: u32 = u32::MAX;
/// Candidates examined per band chain (newest first).
const MAX_CHAIN: usize = 64;

pub struct Deduper {
    opts: DedupOptions,
    hasher: MinHasher,
    exact: HashMap<u128, u32>,
    ids: Ids,
    /// Representative (kept row) of each row's cluster.
    rep: Vec<u32>,
    sketches: Vec<Box<[u32]>>,
    /// Per band: band key -> the latest row with that key; `next` chains to earlier ones.
    tables: Vec<HashMap<u32, u32>>,
    next: Vec<u32>,
}

/// What is computed for a row in parallel before the sequential decision (also what a rank of a
/// sharded run hands to the merge).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Prepared {
    exact: u128,
    near: Option<(Vec<u32>, Vec<u32>)>, // (band keys, sketch)
}

impl Deduper {
    pub fn new(opts: DedupOptions) -> Self {
        assert!(opts.bands > 0 && opts.num_perm.is_multiple_of(opts.bands), "num_perm must be a multiple of bands");
        let hasher = MinHasher::new(opts.num_perm, opts.ngram, opts.seed);
        let tables = (0..opts.bands).map(|_| HashMap::new()).collect();
        Deduper {
            opts,
            hasher,
            exact: HashMap::new(),
            ids: Ids::default(),
            rep: Vec::new(),
            sketches: Vec::new(),
            tables,
            next: Vec::new(),
        }
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

    pub fn prepare(&self, c: &Conversation) -> Prepared {
        let text = self.key_text(c);
        let exact_norm = self.opts.normalization.apply(&text);
        let exact = xxhash_rust::xxh3::xxh3_128(exact_norm.as_bytes());
        let near = (self.opts.mode == DedupMode::Near).then(|| {
            // The exact key is already NFKC + lower-cased when those are on; reuse it.
            let n = &self.opts.normalization;
            let words = if n.nfkc && n.lowercase {
                normalize::split_words(&exact_norm)
            } else {
                normalize::words_for_shingles(&text)
            };
            let sh = self.hasher.shingles(&words);
            let sig: Signature = self.hasher.signature(&sh);
            let rows = self.opts.num_perm / self.opts.bands;
            let keys = (0..self.opts.bands)
                .map(|b| {
                    let bytes: Vec<u8> = sig[b * rows..(b + 1) * rows].iter().flat_map(|v| v.to_le_bytes()).collect();
                    xxh3_64(&bytes) as u32
                })
                .collect();
            (keys, bottom_k(&sh, self.opts.sketch_size))
        });
        Prepared { exact, near }
    }

    /// What the rows of a batch need for their decisions, computed in parallel (nothing when
    /// deduplication is off).
    pub fn prepare_all(&self, batch: &[&Conversation]) -> Vec<Option<Prepared>> {
        if self.opts.mode == DedupMode::None {
            return vec![None; batch.len()];
        }
        batch.par_iter().map(|c| Some(self.prepare(c))).collect()
    }

    /// Decides a batch, in order. Signatures are computed in parallel.
    pub fn process(&mut self, batch: &[Conversation]) -> Vec<Verdict> {
        let prepared = self.prepare_all(&batch.iter().collect::<Vec<_>>());
        batch.iter().zip(prepared).map(|(c, p)| self.decide(&c.id, p)).collect()
    }

    /// Decides one row from what was prepared for it, after every earlier row (input order).
    pub fn decide(&mut self, id: &str, p: Option<Prepared>) -> Verdict {
        let Some(p) = p.filter(|_| self.opts.mode != DedupMode::None) else { return Verdict::Keep };
        if let Some(&seen) = self.exact.get(&p.exact) {
            let r = self.rep[seen as usize];
            return Verdict::Duplicate { of: self.ids.get(r).to_string(), kind: DupKind::Exact, similarity: 1.0 };
        }
        let me = self.ids.push(id);
        self.exact.insert(p.exact, me);
        let Some((keys, sketch)) = p.near else {
            self.rep.push(me);
            return Verdict::Keep;
        };
        // The first candidate at or above the threshold decides (chains are newest first, so in a
        // cluster the latest member matches at once). Each band's chain is walked at most
        // MAX_CHAIN deep, which bounds the work on corpora where thousands of rows share a band.
        let mut best: Option<(u32, f64)> = None;
        let mut seen: Vec<u32> = Vec::new();
        'bands: for (b, key) in keys.iter().enumerate() {
            let mut r = self.tables[b].get(key).copied().unwrap_or(NONE);
            let mut depth = 0;
            while r != NONE && depth < MAX_CHAIN {
                if !seen.contains(&r) {
                    seen.push(r);
                    let sim = jaccard_bottom_k(&sketch, &self.sketches[r as usize], self.opts.sketch_size);
                    if sim >= self.opts.threshold {
                        best = Some((r, sim));
                        break 'bands;
                    }
                }
                r = self.next[r as usize * self.opts.bands + b];
                depth += 1;
            }
        }
        // Index this row (even as a duplicate) so clusters chain transitively.
        debug_assert_eq!(self.next.len(), me as usize * self.opts.bands);
        for (b, key) in keys.into_iter().enumerate() {
            let prev = self.tables[b].insert(key, me).unwrap_or(NONE);
            self.next.push(prev);
        }
        self.sketches.push(sketch.into_boxed_slice());
        match best {
            Some((c, sim)) => {
                let r = self.rep[c as usize];
                self.rep.push(r);
                Verdict::Duplicate { of: self.ids.get(r).to_string(), kind: DupKind::Near, similarity: sim }
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
