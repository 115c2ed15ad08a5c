//! LoRA's two backward products that read the output gradient dy [T, out], `du = dy (s B)` [T, r]
//! and `db = s dy^T u` [out, r], in one pass over dy. Through the general GEMM each ran at 40-60
//! GFLOP/s (`cargo bench --bench kernels`): a rank-8 operand leaves its register tiles mostly
//! empty. Here the rank is the vector width: per element of dy one multiply-add into the row's du
//! and one into db's row, with B's and db's rows shared by `ROWS` rows of dy. Rows of dy run in
//! parallel chunks, each with its own partial db, summed at the end.

use rayon::prelude::*;

/// Rows of dy that share each loaded row of B and of db.
const ROWS: usize = 4;
/// Rows of dy per parallel task.
const CHUNK: usize = 64;

/// `(du, db)` for dy [t, out], b [out, r], u [t, r] and the scale `s`, row-major; `None` for a rank
/// without a kernel (8 and 16 have one).
pub fn output_grads(
    dy: &[f32],
    b: &[f32],
    u: &[f32],
    t: usize,
    out: usize,
    r: usize,
    s: f32,
) -> Option<(Vec<f32>, Vec<f32>)> {
    match r {
        8 => Some(grads::<8>(dy, b, u, t, out, s, super::has_avx2_fma())),
        16 => Some(grads::<16>(dy, b, u, t, out, s, super::has_avx2_fma())),
        _ => None,
    }
}

/// The kernel for rank R; `avx2`: compiled for AVX2 + FMA (only where the CPU has them).
fn grads<const R: usize>(
    dy: &[f32],
    b: &[f32],
    u: &[f32],
    t: usize,
    out: usize,
    s: f32,
    avx2: bool,
) -> (Vec<f32>, Vec<f32>) {
    assert!(dy.len() == t * out && b.len() == out * R && u.len() == t * R, "LoRA gradient shapes");
    let x = Inputs { dy, b: b.as_chunks::<R>().0, u: u.as_chunks::<R>().0, out };
    let mut du = vec![[0f32; R]; t];
    let partials: Vec<Vec<[f32; R]>> = du
        .par_chunks_mut(CHUNK)
        .enumerate()
        .map(|(c, du)| {
            let mut db = vec![[0f32; R]; out];
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: `avx2` is only true where the CPU has AVX2 and FMA (`output_grads` checks).
                unsafe { chunk_avx2(&x, c * CHUNK, du, &mut db) };
                return db;
            }
            chunk::<R, false>(&x, c * CHUNK, du, &mut db);
            db
        })
        .collect();
    let mut db = vec![[0f32; R]; out];
    for p in partials {
        for (acc, row) in db.iter_mut().zip(p) {
            for j in 0..R {
                acc[j] += row[j];
            }
        }
    }
    let scaled = |v: Vec<[f32; R]>| v.into_flattened().into_iter().map(|x| x * s).collect();
    (scaled(du), scaled(db))
}

/// The operands every task reads: dy [T, out], B [out, R] and u [T, R] by rows.
struct Inputs<'a, const R: usize> {
    dy: &'a [f32],
    b: &'a [[f32; R]],
    u: &'a [[f32; R]],
    out: usize,
}

/// The rows of dy from `t0` on that `du` holds: blocks of `ROWS`, then one at a time.
#[inline(always)]
fn chunk<const R: usize, const FMA: bool>(x: &Inputs<R>, t0: usize, du: &mut [[f32; R]], db: &mut [[f32; R]]) {
    let mut i = 0;
    while i + ROWS <= du.len() {
        block::<R, ROWS, FMA>(x, t0 + i, &mut du[i..i + ROWS], db);
        i += ROWS;
    }
    while i < du.len() {
        block::<R, 1, FMA>(x, t0 + i, &mut du[i..i + 1], db);
        i += 1;
    }
}

/// [`chunk`] compiled for AVX2 + FMA (the rank's lanes as 256-bit vectors).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chunk_avx2<const R: usize>(x: &Inputs<R>, t0: usize, du: &mut [[f32; R]], db: &mut [[f32; R]]) {
    chunk::<R, true>(x, t0, du, db)
}

/// N rows of dy from row `r0`: their rows of du (unscaled) and their terms added into db.
#[inline(always)]
fn block<const R: usize, const N: usize, const FMA: bool>(
    x: &Inputs<R>,
    r0: usize,
    du: &mut [[f32; R]],
    db: &mut [[f32; R]],
) {
    let out = x.out;
    let mut acc = [[0f32; R]; N];
    let uu: [[f32; R]; N] = std::array::from_fn(|i| x.u[r0 + i]);
    let rows: [&[f32]; N] = std::array::from_fn(|i| &x.dy[(r0 + i) * out..(r0 + i + 1) * out]);
    for o in 0..out {
        let bo = x.b[o];
        let mut dbo = db[o];
        for i in 0..N {
            let d = rows[i][o];
            for j in 0..R {
                // Fused multiply-adds where the CPU has them (a library call per element elsewhere).
                if FMA {
                    acc[i][j] = d.mul_add(bo[j], acc[i][j]);
                    dbo[j] = d.mul_add(uu[i][j], dbo[j]);
                } else {
                    acc[i][j] += d * bo[j];
                    dbo[j] += d * uu[i][j];
                }
            }
        }
        db[o] = dbo;
    }
    du.copy_from_slice(&acc);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_products_match_the_formulas() {
        // 70 rows: a full parallel chunk, a second one with a tail that is not a multiple of ROWS.
        let (t, out, s) = (70usize, 13usize, 0.7f32);
        let val = |i: usize, k: f32| ((i as f32) * k).sin();
        for r in [8usize, 16] {
            let dy: Vec<f32> = (0..t * out).map(|i| val(i, 0.37)).collect();
            let b: Vec<f32> = (0..out * r).map(|i| val(i, 0.11)).collect();
            let u: Vec<f32> = (0..t * r).map(|i| val(i, 0.23)).collect();
            let (du, db) = output_grads(&dy, &b, &u, t, out, r, s).expect("a kernel for this rank");
            // The portable form gives the same values (up to the rounding of fused multiply-adds).
            let (pdu, pdb) = if r == 8 {
                grads::<8>(&dy, &b, &u, t, out, s, false)
            } else {
                grads::<16>(&dy, &b, &u, t, out, s, false)
            };
            assert!(du.iter().zip(&pdu).chain(db.iter().zip(&pdb)).all(|(a, p)| (a - p).abs() < 1e-5));
            for ti in 0..t {
                for j in 0..r {
                    let want: f64 =
                        (0..out).map(|o| dy[ti * out + o] as f64 * b[o * r + j] as f64).sum::<f64>() * s as f64;
                    assert!((du[ti * r + j] as f64 - want).abs() < 1e-4, "du[{ti}][{j}]");
                }
            }
            for o in 0..out {
                for j in 0..r {
                    let want: f64 =
                        (0..t).map(|ti| dy[ti * out + o] as f64 * u[ti * r + j] as f64).sum::<f64>() * s as f64;
                    assert!((db[o * r + j] as f64 - want).abs() < 1e-4, "db[{o}][{j}]");
                }
            }
        }
        assert!(output_grads(&[0.0; 4], &[0.0; 4], &[0.0; 4], 1, 4, 1, 1.0).is_none());
    }
}
