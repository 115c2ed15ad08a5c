//! MinHash signatures over word n-gram shingles. Each shingle is hashed once (xxh3 of its word
//! hashes); the `num_perm` permutations are multiply-add hashes of that value keeping the high
//! 32 bits, with odd multipliers drawn from the seed.

use crate::split::SplitMix64;
use xxhash_rust::xxh3::xxh3_64;

pub type Signature = Vec<u32>;

pub struct MinHasher {
    a: Vec<u64>,
    b: Vec<u64>,
    ngram: usize,
}

impl MinHasher {
    pub fn new(num_perm: usize, ngram: usize, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let a = (0..num_perm).map(|_| rng.next_u64() | 1).collect();
        let b = (0..num_perm).map(|_| rng.next_u64()).collect();
        MinHasher { a, b, ngram: ngram.max(1) }
    }

    pub fn signature(&self, words: &[String]) -> Signature {
        let mut sig = vec![u32::MAX; self.a.len()];
        let wh: Vec<u64> = words.iter().map(|w| xxh3_64(w.as_bytes())).collect();
        let n = self.ngram.min(wh.len().max(1));
        if wh.is_empty() {
            return sig;
        }
        let mut buf = Vec::with_capacity(n * 8);
        for win in wh.windows(n) {
            buf.clear();
            for h in win {
                buf.extend_from_slice(&h.to_le_bytes());
            }
            let s = xxh3_64(&buf);
            for ((m, &a), &b) in sig.iter_mut().zip(&self.a).zip(&self.b) {
                let v = (a.wrapping_mul(s).wrapping_add(b) >> 32) as u32;
                if v < *m {
                    *m = v;
                }
            }
        }
        sig
    }
}

/// Fraction of equal positions: an unbiased estimate of the Jaccard similarity of the shingle sets.
pub fn estimate_jaccard(a: &[u32], b: &[u32]) -> f64 {
    let eq = a.iter().zip(b).filter(|(x, y)| x == y).count();
    eq as f64 / a.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn estimate_tracks_true_jaccard() {
        let h = MinHasher::new(256, 1, 7);
        // Sets {0..100} and {50..150}: Jaccard 50/150.
        let a: Vec<String> = (0..100).map(|i| format!("w{i}")).collect();
        let b: Vec<String> = (50..150).map(|i| format!("w{i}")).collect();
        let est = estimate_jaccard(&h.signature(&a), &h.signature(&b));
        assert!((est - 1.0 / 3.0).abs() < 0.08, "estimate {est}");
        assert_eq!(estimate_jaccard(&h.signature(&words("a b c")), &h.signature(&words("a b c"))), 1.0);
    }
}
