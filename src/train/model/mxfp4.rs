//! MXFP4 (the OCP microscaling format gpt-oss's experts ship in): blocks of 32 FP4 (E2M1) values
//! packed two to a byte, the low nibble first, each block scaled by a power of two stored as a
//! biased exponent byte (2^(s - 127)). [`dequantize`] unpacks a checkpoint's `_blocks` and
//! `_scales` as transformers does; [`Mxfp4Weight`] keeps one expert matrix in the format as the
//! frozen base of QLoRA (4.25 bits a weight), its matmul dequantising on the fly.

use anyhow::{bail, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Values per block (one scale each).
pub const BLOCK: usize = 32;

/// The sixteen E2M1 values by their 4-bit code.
const FP4: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

/// `blocks` [..., G, 16] and `scales` [..., G] (bytes) -> [..., G * 32] in f32.
pub fn dequantize(blocks: &Tensor, scales: &Tensor) -> Result<Tensor> {
    let dims = blocks.dims();
    if dims.len() < 2 || dims[dims.len() - 1] != 16 || scales.dims() != &dims[..dims.len() - 1] {
        bail!(
            "MXFP4 blocks {:?} and scales {:?} do not pair (blocks [..., G, 16], scales [..., G])",
            dims,
            scales.dims()
        );
    }
    let bytes = blocks.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()?;
    let exps = scales.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()?;
    let mut out = Vec::with_capacity(bytes.len() * 2);
    for (block, &e) in bytes.chunks_exact(16).zip(&exps) {
        let scale = 2f32.powi(e as i32 - 127);
        for &b in block {
            out.push(FP4[(b & 0x0f) as usize] * scale);
            out.push(FP4[(b >> 4) as usize] * scale);
        }
    }
    let mut shape = dims[..dims.len() - 1].to_vec();
    *shape.last_mut().expect("at least 2-D") *= 32;
    Ok(Tensor::from_vec(out, shape, blocks.device())?)
}

/// A frozen weight matrix [rows, cols] held in MXFP4: per row `cols / 32` blocks of 16 bytes and
/// as many scale bytes.
pub struct Mxfp4Weight {
    pub rows: usize,
    pub cols: usize,
    pub blocks: Vec<u8>,
    pub scales: Vec<u8>,
}

impl Mxfp4Weight {
    /// Rows `rows` (in that order) of a checkpoint's `blocks` [R, G, 16] and `scales` [R, G] for one
    /// expert: gpt-oss's interleaved gate (even rows) or up (odd rows) of gate_up, or all of down.
    pub fn from_rows(blocks: &Tensor, scales: &Tensor, rows: impl Iterator<Item = usize>) -> Result<Mxfp4Weight> {
        let (r, g, b) = blocks.dims3()?;
        if b != 16 || scales.dims() != [r, g] {
            bail!("MXFP4 blocks {:?} and scales {:?} do not pair", blocks.dims(), scales.dims());
        }
        let all = blocks.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()?;
        let exps = scales.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()?;
        let (mut out, mut sc, mut n) = (vec![], vec![], 0);
        for row in rows {
            out.extend_from_slice(&all[row * g * 16..(row + 1) * g * 16]);
            sc.extend_from_slice(&exps[row * g..(row + 1) * g]);
            n += 1;
        }
        Ok(Mxfp4Weight { rows: n, cols: g * BLOCK, blocks: out, scales: sc })
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(BLOCK).zip(self.blocks.par_chunks(16)).zip(self.scales.par_iter()).for_each(
            |((o, block), &e)| {
                let scale = 2f32.powi(e as i32 - 127);
                for (pair, &b) in o.chunks_exact_mut(2).zip(block) {
                    pair[0] = FP4[(b & 0x0f) as usize] * scale;
                    pair[1] = FP4[(b >> 4) as usize] * scale;
                }
            },
        );
        out
    }

    pub fn dequantize_tensor(&self, device: &candle_core::Device) -> candle_core::Result<Tensor> {
        Tensor::from_vec(self.dequantize(), (self.rows, self.cols), device)
    }

    /// Storage bytes.
    pub fn bytes(&self) -> usize {
        self.blocks.len() + self.scales.len()
    }
}

/// `y = x @ dequant(W)^T` for a frozen MXFP4 `W`; backward `dx = dy @ dequant(W)`, never dW.
pub struct Mxfp4Matmul {
    pub w: Arc<Mxfp4Weight>,
}

impl CustomOp1 for Mxfp4Matmul {
    fn name(&self) -> &'static str {
        "mxfp4-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let (n, k2) = (self.w.rows, self.w.cols);
        if k != k2 {
            candle_core::bail!("mxfp4-matmul: input has {k} features, weight expects {k2}");
        }
        let w = CpuStorage::F32(self.w.dequantize());
        let wl = Layout::contiguous((n, k)).transpose(0, 1)?;
        let out = x.matmul(&w, (1, m, n, k), xl, &wl)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(dy.matmul(&self.w.dequantize_tensor(x.device())?)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn nibbles_unpack_low_first_and_scale_by_powers_of_two() {
        let mut block = vec![0u8; 16];
        block[0] = 0x72; // low 2 -> 1.0, high 7 -> 6.0
        block[1] = 0xf9; // low 9 -> -0.5, high 15 -> -6.0
        let blocks = Tensor::from_vec(block, (1, 16), &Device::Cpu).unwrap();
        let scales = Tensor::from_vec(vec![128u8], 1, &Device::Cpu).unwrap(); // 2^1
        let out = dequantize(&blocks, &scales).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(out.len(), 32);
        assert_eq!(&out[..4], &[2.0, 12.0, -1.0, -12.0]);
        assert!(out[4..].iter().all(|v| *v == 0.0));
        let bad = Tensor::from_vec(vec![1u8, 2], 2, &Device::Cpu).unwrap();
        assert!(dequantize(&blocks, &bad).is_err());
    }

    #[test]
    fn a_held_weight_takes_the_rows_asked_for_and_dequantises_as_the_whole() {
        // Three rows of one block each: row r's first byte is r + 1 (low nibble r + 1, high 0).
        let mut bytes = vec![0u8; 48];
        for r in 0..3 {
            bytes[r * 16] = r as u8 + 1;
        }
        let blocks = Tensor::from_vec(bytes, (3, 1, 16), &Device::Cpu).unwrap();
        let scales = Tensor::from_vec(vec![127u8, 128, 126], (3, 1), &Device::Cpu).unwrap();
        let whole = dequantize(&blocks, &scales).unwrap().to_vec2::<f32>().unwrap();
        let odd = Mxfp4Weight::from_rows(&blocks, &scales, [2usize, 0].into_iter()).unwrap();
        assert_eq!((odd.rows, odd.cols, odd.bytes()), (2, 32, 34));
        let got = odd.dequantize();
        assert_eq!(&got[..32], &whole[2][..]);
        assert_eq!(&got[32..], &whole[0][..]);
        assert_eq!((got[0], got[32]), (0.75, 0.5)); // code 3 (1.5) at 2^-1; code 1 (0.5) at 2^0
    }
}
