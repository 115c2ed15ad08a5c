//! PiSSA and OLoRA initialisation (PEFT's `init_lora_weights="pissa"`, `"pissa_niter_N"`,
//! `"olora"`): A and B start from the base weight's own factors instead of noise and zeros, and the
//! base becomes the residual `W - s B A`, so the adapted layer starts equal to the base. PiSSA
//! takes the r principal singular triplets (`B = U_r sqrt(S_r / s)`, `A = sqrt(S_r / s) V_r^T`;
//! `pissa_niter_N`: a randomised SVD with N subspace iterations, as `torch.svd_lowrank`), OLoRA the
//! first r columns of Q and rows of R of `W = Q R`. Factors are unique up to the sign of each
//! triplet, and B A with it: the trained adapter is the same up to those signs (AdamW is
//! sign-equivariant). Saved, the adapter is converted to plain LoRA on the original base as PEFT's
//! `path_initial_model_for_weight_conversion` does ([`crate::train::io::peft`]).

use crate::split::SplitMix64;
use anyhow::{bail, Result};
use faer::Mat;
use serde::{Deserialize, Serialize};

/// How A and B start (`--lora-init`, PEFT's `init_lora_weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum LoraInit {
    /// A Kaiming-uniform, B zeros (PEFT's `True`).
    #[default]
    Default,
    /// The r principal singular triplets of W (exact SVD).
    Pissa,
    /// PiSSA through a randomised SVD with this many subspace iterations.
    PissaNiter(usize),
    /// The first r factors of W's QR decomposition.
    Olora,
}

impl LoraInit {
    /// Whether the base weight becomes the residual `W - s B A` (every init but the default).
    pub fn mutates_base(self) -> bool {
        self != LoraInit::Default
    }

    /// PEFT's spelling: `true`, `pissa`, `pissa_niter_N`, `olora`.
    pub fn peft_name(self) -> String {
        match self {
            LoraInit::Default => "true".into(),
            LoraInit::Pissa => "pissa".into(),
            LoraInit::PissaNiter(n) => format!("pissa_niter_{n}"),
            LoraInit::Olora => "olora".into(),
        }
    }

    /// Reads `--lora-init` or PEFT's `init_lora_weights` (`default`/`true`, `pissa`,
    /// `pissa_niter_N`, `olora`).
    pub fn parse(s: &str) -> Result<LoraInit> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "default" | "true" | "kaiming" => LoraInit::Default,
            "pissa" => LoraInit::Pissa,
            "olora" => LoraInit::Olora,
            other => match other.strip_prefix("pissa_niter_").map(str::parse::<usize>) {
                Some(Ok(n)) => LoraInit::PissaNiter(n),
                _ => bail!(
                    "--lora-init '{s}': use default, pissa, pissa_niter_N (a randomised SVD with N iterations, \
                     PEFT suggests 4 to 16) or olora"
                ),
            },
        })
    }
}

impl From<LoraInit> for String {
    fn from(i: LoraInit) -> String {
        i.peft_name()
    }
}

impl TryFrom<String> for LoraInit {
    type Error = anyhow::Error;
    fn try_from(s: String) -> Result<LoraInit> {
        LoraInit::parse(&s)
    }
}

/// A [r, in] and B [out, r] (row-major) from W [out, in] (row-major f32) for `init` at scale `s`.
/// `rng` draws the randomised SVD's test matrix.
pub fn factors(
    w: &[f32],
    (out, inp): (usize, usize),
    r: usize,
    scale: f64,
    init: LoraInit,
    rng: &mut SplitMix64,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let k = out.min(inp);
    if r > k {
        bail!(
            "--lora-init {}: rank {r} exceeds this {out}x{inp} weight's {k} factors; lower --lora-r",
            init.peft_name()
        );
    }
    // In f64: f32 factors of a weight whose leading singular values lie close together drift
    // by 1e-5 (LAPACK's f32 SVD is nearer the exact one than that).
    let w = Mat::<f64>::from_fn(out, inp, |i, j| w[i * inp + j] as f64);
    let (mut a, mut b) = (vec![0f32; r * inp], vec![0f32; out * r]);
    match init {
        LoraInit::Default => bail!("the default initialisation draws A at random; it has no factors"),
        LoraInit::Olora => {
            // Householder QR makes column j of Q from W's first j columns alone: Q's first r
            // columns are those of W's first r columns' QR, and R's first r rows are Q_r^T W.
            let q = w.subcols(0, r).qr().compute_thin_Q();
            let rr = q.transpose() * &w;
            for i in 0..r {
                for j in 0..inp {
                    a[i * inp + j] = rr[(i, j)] as f32;
                }
                for o in 0..out {
                    b[o * r + i] = q[(o, i)] as f32;
                }
            }
        }
        LoraInit::Pissa | LoraInit::PissaNiter(_) => {
            let (u, s, v) = match init {
                LoraInit::PissaNiter(n) => randomised_svd(&w, r, n, rng)?,
                _ => leading_svd(&w, r)?,
            };
            for i in 0..r {
                let root = (s[i] / scale).sqrt();
                for j in 0..inp {
                    a[i * inp + j] = (root * v[(j, i)]) as f32;
                }
                for o in 0..out {
                    b[o * r + i] = (u[(o, i)] * root) as f32;
                }
            }
        }
    }
    Ok((a, b))
}

/// The r leading singular triplets of `w`, exactly, from the eigenvectors of its smaller Gram matrix
/// (`w w^T` or `w^T w`, in f64: a third of a full SVD's time, and the leading vectors as accurate
/// as f32 needs); the other side's vectors are `w^T u / sigma` (or `w v / sigma`).
fn leading_svd(w: &Mat<f64>, r: usize) -> Result<Triplets> {
    let wide = w.nrows() <= w.ncols();
    let gram = if wide { w * w.transpose() } else { w.transpose() * w };
    let eig = gram
        .self_adjoint_eigen(faer::Side::Lower)
        .map_err(|e| anyhow::anyhow!("eigendecomposition did not converge: {e:?}"))?;
    let k = gram.nrows();
    // Eigenvalues ascend: the leading r are the last, largest first.
    let s: Vec<f64> = (0..r).map(|i| eig.S()[k - 1 - i].max(0.0).sqrt()).collect();
    let near = Mat::<f64>::from_fn(k, r, |row, i| eig.U()[(row, k - 1 - i)]);
    let mut far = if wide { w.transpose() * &near } else { w * &near };
    for (i, &sigma) in s.iter().enumerate() {
        if sigma == 0.0 {
            bail!("the weight has rank below {r}: its singular value {} is 0; lower --lora-r", i + 1);
        }
        for row in 0..far.nrows() {
            far[(row, i)] /= sigma;
        }
    }
    Ok(if wide { (near, s, far) } else { (far, s, near) })
}

/// The r leading singular triplets of `w` by Halko et al.'s randomised range finder, as
/// `torch.svd_lowrank(w, q=r, niter)`: Q spans `w` times a Gaussian test matrix, refined by
/// `niter` rounds of `Q = qr(w^T Q)`, `Q = qr(w Q)`; then the SVD of the small `Q^T w`.
type Triplets = (Mat<f64>, Vec<f64>, Mat<f64>);

fn randomised_svd(w: &Mat<f64>, r: usize, niter: usize, rng: &mut SplitMix64) -> Result<Triplets> {
    let inp = w.ncols();
    let omega = Mat::<f64>::from_fn(inp, r, |_, _| rng.normal());
    let basis = |m: Mat<f64>| m.qr().compute_thin_Q();
    let mut q = basis(w * &omega);
    for _ in 0..niter {
        q = basis(w.transpose() * &q);
        q = basis(w * &q);
    }
    let small = q.transpose() * w; // [r, in]
    let (u, s, v) = leading_svd(&small, r)?;
    Ok((&q * &u, s, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(out: usize, inp: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        (0..out * inp).map(|_| rng.normal() as f32).collect()
    }

    /// `s B A` of the factors, row-major [out, in].
    fn product(a: &[f32], b: &[f32], (out, inp): (usize, usize), r: usize, s: f64) -> Vec<f32> {
        let mut p = vec![0f32; out * inp];
        for o in 0..out {
            for j in 0..inp {
                p[o * inp + j] = s as f32 * (0..r).map(|i| b[o * r + i] * a[i * inp + j]).sum::<f32>();
            }
        }
        p
    }

    #[test]
    fn full_rank_factors_rebuild_the_weight() {
        for init in [LoraInit::Pissa, LoraInit::Olora, LoraInit::PissaNiter(4)] {
            for dims in [(12, 20), (20, 12)] {
                let w = random(dims.0, dims.1, 7);
                let k = dims.0.min(dims.1);
                let (a, b) = factors(&w, dims, k, 2.0, init, &mut SplitMix64::new(1)).unwrap();
                // PiSSA's factors carry 1/s (s B A = W); OLoRA's do not (B A = W, the residual (1 - s) W).
                let s = if init == LoraInit::Olora { 1.0 } else { 2.0 };
                let p = product(&a, &b, dims, k, s);
                let d = w.iter().zip(&p).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                assert!(d < 1e-4, "{init:?} {dims:?}: full-rank factors differ from W by {d}");
            }
        }
    }

    #[test]
    fn pissa_keeps_the_largest_singular_values_and_the_randomised_svd_finds_them() {
        // A decaying spectrum, as trained weights have: G1 diag(0.6^i) G2.
        let dims = (24, 40);
        let (g1, g2) = (random(24, 24, 3), random(24, 40, 4));
        let w: Vec<f32> = (0..24 * 40)
            .map(|x| (0..24).map(|i| g1[(x / 40) * 24 + i] * 0.6f32.powi(i as i32) * g2[i * 40 + x % 40]).sum())
            .collect();
        let exact = factors(&w, dims, 4, 1.0, LoraInit::Pissa, &mut SplitMix64::new(1)).unwrap();
        let approx = factors(&w, dims, 4, 1.0, LoraInit::PissaNiter(16), &mut SplitMix64::new(1)).unwrap();
        let (p, q) = (product(&exact.0, &exact.1, dims, 4, 1.0), product(&approx.0, &approx.1, dims, 4, 1.0));
        let d = p.iter().zip(&q).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(d < 1e-3, "randomised PiSSA differs from the exact one by {d}");
        // The residual's largest singular value is W's fifth: its norm is below W's.
        let residual: Vec<f32> = w.iter().zip(&p).map(|(x, y)| x - y).collect();
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>();
        assert!(norm(&residual) < norm(&w) * 0.8);
    }

    #[test]
    fn names_parse_as_peft_spells_them() {
        for (s, i) in [
            ("pissa", LoraInit::Pissa),
            ("pissa_niter_4", LoraInit::PissaNiter(4)),
            ("olora", LoraInit::Olora),
            ("true", LoraInit::Default),
        ] {
            assert_eq!(LoraInit::parse(s).unwrap(), i);
            assert_eq!(LoraInit::parse(&i.peft_name()).unwrap(), i);
        }
        assert!(LoraInit::parse("loftq").unwrap_err().to_string().contains("pissa_niter_N"));
    }
}
