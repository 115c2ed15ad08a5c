//! Rotary embeddings in Hugging Face's layout and their backward, each one pass over x [T, heads, hd]
//! with the position's cos/sin rows [T, hd] (candle's ops take five passes and temporaries each
//! way: halves, negation, concatenation, two broadcast products, a sum), tokens in parallel.
//!
//! With halves `[x1, x2]` of a head: `y1 = x1 c1 - x2 s1`, `y2 = x2 c2 + x1 s2`; the backward is
//! the transpose, `dx1 = dy1 c1 + dy2 s2`, `dx2 = dy2 c2 - dy1 s1`.

use rayon::prelude::*;

/// Tokens per parallel task.
const TOKENS: usize = 16;

/// The rotation of x [T, heads, hd] (`backward = false`) or its transpose applied to dy.
pub fn rotate(x: &[f32], cos: &[f32], sin: &[f32], heads: usize, hd: usize, backward: bool) -> Vec<f32> {
    let row = heads * hd;
    assert!(
        hd.is_multiple_of(2)
            && x.len().is_multiple_of(row.max(1))
            && cos.len() * heads == x.len()
            && sin.len() == cos.len()
    );
    let half = hd / 2;
    let mut y = super::output_buffer(x.len());
    y.par_chunks_mut(row * TOKENS)
        .zip(x.par_chunks(row * TOKENS))
        .zip(cos.par_chunks(hd * TOKENS).zip(sin.par_chunks(hd * TOKENS)))
        .for_each(|((y, x), (cos, sin))| {
            for (((y, x), c), s) in y.chunks_mut(row).zip(x.chunks(row)).zip(cos.chunks(hd)).zip(sin.chunks(hd)) {
                let (c1, c2) = c.split_at(half);
                let (s1, s2) = s.split_at(half);
                // In the backward the sines trade places and signs: the transpose of the rotation.
                let (sa, sb, sign) = if backward { (s2, s1, -1.0f32) } else { (s1, s2, 1.0f32) };
                for (y, x) in y.chunks_mut(hd).zip(x.chunks(hd)) {
                    let (x1, x2) = x.split_at(half);
                    let (y1, y2) = y.split_at_mut(half);
                    for i in 0..half {
                        y1[i] = x1[i] * c1[i] - sign * x2[i] * sa[i];
                        y2[i] = x2[i] * c2[i] + sign * x1[i] * sb[i];
                    }
                }
            }
        });
    y
}
