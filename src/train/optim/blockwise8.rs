//! 8-bit optimizer states as bitsandbytes keeps them (`AdamW8bit`): each state tensor in blocks of
//! [`BLOCK`] values, each block one f32 scale (its largest magnitude) and one byte per value, the
//! index of the nearest entry of bitsandbytes' dynamic map (`create_dynamic_map`: signed for
//! Adam's first moment, unsigned for the second) to the value over the scale. Tensors smaller than
//! [`MIN_8BIT_SIZE`] keep f32 states, as bitsandbytes' `min_8bit_size`.

use std::sync::OnceLock;

/// Values per block (bitsandbytes' blockwise optimizers, 0.45 on: 256; 2048 before).
pub const BLOCK: usize = 256;

/// Tensors with fewer values keep 32-bit states (bitsandbytes' `min_8bit_size` default).
pub const MIN_8BIT_SIZE: usize = 4096;

/// One state tensor in 8 bits: a code per value and a scale per block.
#[derive(Clone, Debug)]
pub struct Blockwise8 {
    pub codes: Vec<u8>,
    pub absmax: Vec<f32>,
}

impl Blockwise8 {
    /// `n` zeros.
    pub fn zeros(n: usize) -> Self {
        Blockwise8 { codes: vec![0; n], absmax: vec![0.0; n.div_ceil(BLOCK)] }
    }

    /// Bytes held (codes and scales).
    pub fn bytes(&self) -> usize {
        self.codes.len() + 4 * self.absmax.len()
    }
}

/// bitsandbytes' dynamic map of 256 sorted values in [-1, 1] (signed) or [0, 1]: seven decades,
/// each with twice the fraction values of the one below (`create_dynamic_map(signed, 7, 8)`),
/// then 0 and 1. The lowest entry is then set to -1 in both, as bitsandbytes' CPU quantiser sets
/// it: a value of the unsigned map then never rounds to 0 but to its smallest entry (3.25e-7 of
/// the block's scale), a floor under Adam's second moment without which a first moment would be
/// divided by eps alone once its second moment rounds away.
pub fn dynamic_map(signed: bool) -> &'static [f32; 256] {
    static SIGNED: OnceLock<[f32; 256]> = OnceLock::new();
    static UNSIGNED: OnceLock<[f32; 256]> = OnceLock::new();
    let cell = if signed { &SIGNED } else { &UNSIGNED };
    cell.get_or_init(|| {
        let mut data: Vec<f32> = vec![];
        for i in 0..7 {
            let items = if signed { (1 << i) + 1 } else { (1 << (i + 1)) + 1 };
            let b = linspace_f32(0.1, 1.0, items);
            let scale = 10f64.powi(i - 6) as f32;
            for w in b.windows(2) {
                let mean = (w[0] + w[1]) / 2.0;
                data.push(scale * mean);
                if signed {
                    data.push(-(scale * mean));
                }
            }
        }
        data.push(0.0);
        data.push(1.0);
        while data.len() < 256 {
            data.push(0.0);
        }
        data.sort_by(f32::total_cmp);
        data[0] = -1.0;
        data.try_into().expect("256 values")
    })
}

/// torch.linspace in f32: from both ends toward the middle, each value one fused multiply-add
/// (torch's vectorised kernel; the map then equals bitsandbytes' to the bit).
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| if i < half { step.mul_add(i as f32, start) } else { (-step).mul_add((steps - 1 - i) as f32, end) })
        .collect()
}

/// The index of the map entry nearest to `x` (ties to the lower one, as bitsandbytes).
pub fn nearest(map: &[f32; 256], x: f32) -> u8 {
    nearest_from(map, map.partition_point(|&c| c < x).min(255), x)
}

/// The nearest entry, given `hi`: the first entry not below `x` (255 at most).
#[inline]
fn nearest_from(map: &[f32; 256], hi: usize, x: f32) -> u8 {
    if hi == 0 {
        return 0;
    }
    let lo = hi - 1;
    if (x - map[hi]).abs() < (x - map[lo]).abs() {
        hi as u8
    } else {
        lo as u8
    }
}

/// [`nearest`] in constant time: floats ordered as integers, their top 16 bits a bucket, each
/// bucket the count of map entries below it; the few entries inside a bucket are stepped over.
pub struct Lookup {
    map: &'static [f32; 256],
    below: Vec<u16>,
}

/// A float's bits as an integer of the same order.
#[inline]
fn ordered(x: f32) -> u32 {
    let b = x.to_bits();
    if b >> 31 == 1 {
        !b
    } else {
        b | 0x8000_0000
    }
}

impl Lookup {
    pub fn new(map: &'static [f32; 256]) -> Self {
        let keys: Vec<u32> = map.iter().map(|&c| ordered(c)).collect();
        let below = (0..=u16::MAX as u32).map(|b| keys.partition_point(|&k| k < b << 16) as u16).collect();
        Lookup { map, below }
    }

    /// The signed or unsigned map's lookup, built once.
    pub fn of(signed: bool) -> &'static Lookup {
        static SIGNED: OnceLock<Lookup> = OnceLock::new();
        static UNSIGNED: OnceLock<Lookup> = OnceLock::new();
        let cell = if signed { &SIGNED } else { &UNSIGNED };
        cell.get_or_init(|| Lookup::new(dynamic_map(signed)))
    }

    /// The index of the entry nearest to `x`, as [`nearest`].
    #[inline]
    pub fn nearest(&self, x: f32) -> u8 {
        let mut hi = self.below[(ordered(x) >> 16) as usize] as usize;
        while hi < 256 && self.map[hi] < x {
            hi += 1;
        }
        nearest_from(self.map, hi.min(255), x)
    }
}

/// Quantises one block's values into `codes`, returning its scale (0 for a block of zeros).
pub fn quantise_block(lookup: &Lookup, values: &[f32], codes: &mut [u8]) -> f32 {
    let absmax = values.iter().fold(0f32, |a, v| a.max(v.abs()));
    let zero = lookup.nearest(0.0);
    for (c, &v) in codes.iter_mut().zip(values) {
        *c = if absmax > 0.0 { lookup.nearest(v / absmax) } else { zero };
    }
    absmax
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_span_their_range_sorted() {
        let s = dynamic_map(true);
        let u = dynamic_map(false);
        assert_eq!((s[0], s[255]), (-1.0, 1.0));
        assert_eq!((u[0], u[255]), (-1.0, 1.0));
        assert!((u[1] - 3.25e-7).abs() < 1e-12, "{}", u[1]);
        assert!(s.windows(2).all(|w| w[0] <= w[1]) && u.windows(2).all(|w| w[0] <= w[1]));
        // Seven decades: the smallest positive entry is about 1e-6 of the largest.
        let min_pos = s.iter().copied().filter(|&v| v > 0.0).fold(1.0, f32::min);
        assert!(min_pos > 1e-7 && min_pos < 1e-5, "{min_pos}");
    }

    #[test]
    fn a_block_round_trips_within_the_map_spacing() {
        let map = dynamic_map(true);
        let values: Vec<f32> = (0..BLOCK).map(|i| ((i as f32) * 0.37).sin() * 0.01).collect();
        let mut codes = vec![0u8; BLOCK];
        let absmax = quantise_block(Lookup::of(true), &values, &mut codes);
        for (v, c) in values.iter().zip(&codes) {
            let back = map[*c as usize] * absmax;
            // The map's spacing near 1 is about 1.4% of the scale (2.1% between -1 and the next).
            assert!((back - v).abs() <= 0.011 * absmax, "{v} came back as {back}");
        }
        assert_eq!(nearest(map, 1.0), 255);
        assert_eq!(map[nearest(map, 0.0) as usize], 0.0);
        // A second moment of zero keeps the unsigned map's floor.
        let u = dynamic_map(false);
        assert_eq!(nearest(u, 0.0), 1);
    }

    #[test]
    fn the_lookup_finds_the_nearest_entry_as_the_search_does() {
        let mut r = crate::split::SplitMix64::new(7);
        for signed in [true, false] {
            let (map, lookup) = (dynamic_map(signed), Lookup::of(signed));
            // Every entry, the midpoints between neighbours and their float neighbours, and random
            // values over the decades.
            let mut xs: Vec<f32> = map.to_vec();
            for w in map.windows(2) {
                let mid = (w[0] + w[1]) / 2.0;
                xs.extend([mid, f32::from_bits(mid.to_bits() + 1), f32::from_bits(mid.to_bits().max(1) - 1)]);
            }
            for _ in 0..100_000 {
                let u = (r.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
                let x = 10f32.powf(-8.0 * u) * if signed && r.next_u64().is_multiple_of(2) { -1.0 } else { 1.0 };
                xs.push(x);
            }
            for x in xs {
                assert_eq!(lookup.nearest(x), nearest(map, x), "{x}");
            }
        }
    }
}
