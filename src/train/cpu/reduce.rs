//! Dot products of f32 rows in sixteen running sums: `iter().sum()` adds one product at a time into
//! one sum, a chain the CPU cannot overlap (four cycles an element), which made RMSNorm's row
//! statistics most of its time. Sixteen independent sums are vectorised by the compiler at any
//! target and added up at the end (a different order than the one chain, no less accurate).

/// Lanes of running sums.
const LANES: usize = 16;

/// `sum_i a_i b_i`.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot of rows of one length");
    let (ca, ta) = a.as_chunks::<LANES>();
    let (cb, tb) = b.as_chunks::<LANES>();
    let mut acc = [0f32; LANES];
    for (x, y) in ca.iter().zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + ta.iter().zip(tb).map(|(x, y)| x * y).sum::<f32>()
}

/// `sum_i a_i b_i c_i`.
pub fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    assert!(a.len() == b.len() && a.len() == c.len(), "dot of rows of one length");
    let (ca, ta) = a.as_chunks::<LANES>();
    let (cb, tb) = b.as_chunks::<LANES>();
    let (cc, tc) = c.as_chunks::<LANES>();
    let mut acc = [0f32; LANES];
    for ((x, y), z) in ca.iter().zip(cb).zip(cc) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l] * z[l];
        }
    }
    acc.iter().sum::<f32>() + ta.iter().zip(tb).zip(tc).map(|((x, y), z)| x * y * z).sum::<f32>()
}

#[cfg(test)]
mod tests {
    #[test]
    fn dots_equal_the_sums_in_f64() {
        for n in [0, 1, 15, 16, 17, 64, 576, 1000] {
            let a: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.11).cos()).collect();
            let c: Vec<f32> = (0..n).map(|i| 1.0 + (i as f32) * 0.01).collect();
            let want2: f64 = (0..n).map(|i| a[i] as f64 * b[i] as f64).sum();
            let want3: f64 = (0..n).map(|i| a[i] as f64 * b[i] as f64 * c[i] as f64).sum();
            assert!((super::dot(&a, &b) as f64 - want2).abs() <= 1e-5 * (1.0 + want2.abs()), "dot of {n}");
            assert!((super::dot3(&a, &b, &c) as f64 - want3).abs() <= 1e-5 * (1.0 + want3.abs()), "dot3 of {n}");
        }
    }
}
