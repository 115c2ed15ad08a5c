//! MXFP4 (the OCP microscaling format gpt-oss's experts ship in): blocks of 32 FP4 (E2M1) values
//! packed two to a byte, the low nibble first, each block scaled by a power of two stored as a
//! biased exponent byte (2^(s - 127)). [`dequantize`] unpacks a checkpoint's `_blocks` and
//! `_scales` as transformers does.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

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
}
