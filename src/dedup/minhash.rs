//! MinHash signatures and bottom-k sketches over word n-gram shingles.
//!
//! Each shingle is hashed once (xxh3 of its word hashes). The MinHash signature (`num_perm`
//! multiply-add permutations, high 32 bits) feeds LSH banding and is then dropped. What is kept per
//! row to check candidates is a bottom-k sketch: the k smallest distinct shingle hashes. For a row
//! with at most k shingles the sketch is the whole set, so the similarity check is the exact
//! Jaccard; for longer rows it is the standard bottom-k estimate. Memory stays at most 4k bytes a row.

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

    /// One 64-bit hash per shingle (n consecutive words; a shorter row is one shingle).
    pub fn shingles(&self, words: &[String]) -> Vec<u64> {
        let wh: Vec<u64> = words.iter().map(|w| xxh3_64(w.as_bytes())).collect();
        if wh.is_empty() {
            return Vec::new();
        }
        let n = self.ngram.min(wh.len());
        let mut buf = Vec::with_capacity(n * 8);
        wh.windows(n)
            .map(|win| {
                buf.clear();
                for h in win {
                    buf.extend_from_slice(&h.to_le_bytes());
                }
                xxh3_64(&buf)
            })
            .collect()
    }

    pub fn signature(&self, shingles: &[u64]) -> Signature {
        let mut sig = vec![u32::MAX; self.a.len()];
        for &s in shingles {
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

/// The k smallest distinct shingle hashes (32-bit), sorted.
pub fn bottom_k(shingles: &[u64], k: usize) -> Vec<u32> {
    let mut v: Vec<u32> = shingles.iter().map(|&s| (s >> 32) as u32).collect();
    v.sort_unstable();
    v.dedup();
    v.truncate(k);
    v
}

/// Jaccard similarity from two bottom-k sketches: exact when both rows have at most k shingles.
pub fn jaccard_bottom_k(a: &[u32], b: &[u32], k: usize) -> f64 {
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    // The k smallest of the union of the sketches are the k smallest of the union of the sets;
    // count those in both. When both sketches are whole sets, walk the whole union: exact Jaccard.
    let limit = if a.len() < k && b.len() < k { usize::MAX } else { k };
    let (mut i, mut j, mut union, mut both) = (0, 0, 0usize, 0usize);
    while union < limit && (i < a.len() || j < b.len()) {
        match (a.get(i), b.get(j)) {
            (Some(x), Some(y)) if x == y => {
                both += 1;
                i += 1;
                j += 1;
            }
            (Some(x), Some(y)) if x < y => i += 1,
            (Some(_), Some(_)) => j += 1,
            (Some(_), None) => i += 1,
            (None, _) => j += 1,
        }
        union += 1;
    }
    both as f64 / union.max(1) as f64
}

/// Fraction of equal positions of two MinHash signatures.
pub fn estimate_jaccard(a: &[u32], b: &[u32]) -> f64 {
    let eq = a.iter().zip(b).filter(|(x, y)| x == y).count();
    eq as f64 / a.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(r: std::ops::Range<usize>) -> Vec<String> {
        r.map(|i| format!("w{i}")).collect()
    }

    #[test]
    fn minhash_estimate_tracks_true_jaccard() {
        let h = MinHasher::new(256, 1, 7);
        let (a, b) = (h.shingles(&set(0..100)), h.shingles(&set(50..150)));
        let est = estimate_jaccard(&h.signature(&a), &h.signature(&b));
        assert!((est - 1.0 / 3.0).abs() < 0.08, "estimate {est}");
    }

    #[test]
    fn bottom_k_is_exact_for_small_sets_and_close_for_large_ones() {
        let h = MinHasher::new(4, 1, 7);
        let (a, b) = (h.shingles(&set(0..100)), h.shingles(&set(50..150)));
        let j = jaccard_bottom_k(&bottom_k(&a, 128), &bottom_k(&b, 128), 128);
        assert!((j - 50.0 / 150.0).abs() < 1e-9, "{j}");
        let (a, b) = (h.shingles(&set(0..2000)), h.shingles(&set(400..2400)));
        let j = jaccard_bottom_k(&bottom_k(&a, 128), &bottom_k(&b, 128), 128);
        assert!((j - 1600.0 / 2400.0).abs() < 0.12, "{j}");
        assert_eq!(jaccard_bottom_k(&bottom_k(&a, 128), &bottom_k(&a, 128), 128), 1.0);
    }
}
