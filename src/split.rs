//! Deterministic randomness: a seeded SplitMix64 generator for shuffles, and a hash-based
//! train/eval assignment that depends only on the record id and the seed (not on order).

use xxhash_rust::xxh3::xxh3_64_with_seed;

#[derive(Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    /// The generator's state, for checkpoints.
    pub fn state(&self) -> u64 {
        self.0
    }
    pub fn from_state(state: u64) -> Self {
        SplitMix64(state)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1), 53 bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller, two draws).
    pub fn normal(&mut self) -> f64 {
        let u1 = ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// True when the record with this id belongs to the eval split.
pub fn is_eval(id: &str, seed: u64, fraction: f64) -> bool {
    if fraction <= 0.0 {
        return false;
    }
    let h = xxh3_64_with_seed(id.as_bytes(), seed);
    (h as f64 / u64::MAX as f64) < fraction
}
