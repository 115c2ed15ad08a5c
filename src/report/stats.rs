//! Summary statistics of lengths and counts: quantiles as numpy computes them, and histograms.

use serde::Serialize;

/// Min, max, mean and quantiles of a set of values.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Distribution {
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    pub median: f64,
    pub p5: f64,
    pub p95: f64,
}

impl Distribution {
    /// numpy-style linear-interpolated quantiles.
    pub fn of(values: &mut [f64]) -> Distribution {
        if values.is_empty() {
            return Distribution::default();
        }
        values.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
        let q = |p: f64| {
            let pos = p * (values.len() - 1) as f64;
            let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
            values[lo] + (values[hi] - values[lo]) * (pos - lo as f64)
        };
        Distribution {
            min: values[0],
            max: values[values.len() - 1],
            mean: values.iter().sum::<f64>() / values.len() as f64,
            median: q(0.5),
            p5: q(0.05),
            p95: q(0.95),
        }
    }
}

/// `bins` equal-width bins from 0 to the maximum, each a whole number wide (token lengths):
/// (left edges, counts).
pub fn histogram(values: &[f64], bins: usize) -> (Vec<f64>, Vec<u64>) {
    let max = values.iter().cloned().fold(0.0, f64::max).max(1.0);
    binned(values, bins, (max / bins as f64).ceil().max(1.0))
}

/// `bins` bins of `width` from 0, the last one also holding everything beyond: (left edges, counts).
pub fn binned(values: &[f64], bins: usize, width: f64) -> (Vec<f64>, Vec<u64>) {
    if values.is_empty() {
        return (vec![], vec![]);
    }
    let mut counts = vec![0u64; bins];
    for &v in values {
        counts[((v / width) as usize).min(bins - 1)] += 1;
    }
    ((0..bins).map(|i| i as f64 * width).collect(), counts)
}

/// Bins (left edges, counts) as labelled bars, each named by its bin's start.
pub fn bars((edges, counts): (Vec<f64>, Vec<u64>), label: impl Fn(f64) -> String) -> Vec<(String, f64)> {
    edges.iter().zip(&counts).map(|(e, c)| (label(*e), *c as f64)).collect()
}
