//! Frozen base weights held quantised (QLoRA): NormalFloat4 as the QLoRA paper defines it (16 code
//! values, blocks of 64 weights with an absmax scale, the scales double-quantised to 8 bits in blocks
//! of 256 around their mean), a GGUF file's own blocks, and both forms on a GPU. Each has a matmul op
//! that dequantises on the fly in forward and backward and returns only the input gradient, so the
//! dense weight never stays in memory.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// The 16 NF4 code values (quantiles of N(0, 1) normalised to [-1, 1], with an exact zero).
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

pub const BLOCK: usize = 64;
pub const SCALE_BLOCK: usize = 256;

/// Index of the nearest code value.
fn nearest(x: f32) -> u8 {
    let mut lo = 0usize;
    for i in 0..15 {
        if x > (NF4[i] + NF4[i + 1]) * 0.5 {
            lo = i + 1;
        }
    }
    lo as u8
}

/// A block's absmax back from 8 bits, in the order of operations the GPU form repeats exactly.
fn dequantize_scale(q: i8, scale2: f32, offset: f32) -> f32 {
    q as f32 * (1.0 / 127.0f32) * scale2 + offset
}

/// A weight matrix [rows, cols] in NF4 with double-quantised block scales.
pub struct Nf4Weight {
    pub rows: usize,
    pub cols: usize,
    /// Two codes per byte, first element in the low nibble.
    pub codes: Vec<u8>,
    /// Block absmax values, 8-bit, relative to `offset`, scaled per 256 blocks by `scale2`.
    pub absmax_q: Vec<i8>,
    pub scale2: Vec<f32>,
    pub offset: f32,
}

impl Nf4Weight {
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Nf4Weight {
        let n = w.len();
        let nblocks = n.div_ceil(BLOCK);
        let absmax: Vec<f32> = (0..nblocks)
            .into_par_iter()
            .map(|b| w[b * BLOCK..((b + 1) * BLOCK).min(n)].iter().fold(0f32, |m, v| m.max(v.abs())))
            .collect();
        // Double quantisation of the scales: 8-bit around their mean, per 256 blocks.
        let offset = absmax.iter().sum::<f32>() / nblocks.max(1) as f32;
        let scale2: Vec<f32> = absmax
            .chunks(SCALE_BLOCK)
            .map(|c| c.iter().fold(0f32, |m, v| m.max((v - offset).abs())).max(1e-12))
            .collect();
        let absmax_q: Vec<i8> = absmax
            .iter()
            .enumerate()
            .map(|(i, a)| ((a - offset) / scale2[i / SCALE_BLOCK] * 127.0).round().clamp(-127.0, 127.0) as i8)
            .collect();
        let mut codes = vec![0u8; n.div_ceil(2)];
        let deq_absmax: Vec<f32> =
            (0..nblocks).map(|b| dequantize_scale(absmax_q[b], scale2[b / SCALE_BLOCK], offset)).collect();
        codes.par_chunks_mut(BLOCK / 2).enumerate().for_each(|(b, out)| {
            let scale = deq_absmax[b];
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            for (j, byte) in out.iter_mut().enumerate() {
                let i = b * BLOCK + 2 * j;
                let lo = if i < n { nearest(w[i] * inv) } else { 7 };
                let hi = if i + 1 < n { nearest(w[i + 1] * inv) } else { 7 };
                *byte = lo | (hi << 4);
            }
        });
        Nf4Weight { rows, cols, codes, absmax_q, scale2, offset }
    }

    pub fn block_scale(&self, b: usize) -> f32 {
        dequantize_scale(self.absmax_q[b], self.scale2[b / SCALE_BLOCK], self.offset)
    }

    /// The code value of element `i` (before its block's scale).
    fn value(&self, i: usize) -> f32 {
        let c = self.codes[i / 2];
        NF4[if i.is_multiple_of(2) { c & 15 } else { c >> 4 } as usize]
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let n = self.rows * self.cols;
        let mut out = vec![0f32; n];
        out.par_chunks_mut(BLOCK).enumerate().for_each(|(b, o)| {
            let s = self.block_scale(b);
            for (j, v) in o.iter_mut().enumerate() {
                *v = self.value(b * BLOCK + j) * s;
            }
        });
        out
    }

    /// Rows `ids` of the matrix, dequantised ([ids.len(), cols] row-major): an embedding lookup.
    pub fn dequantize_rows(&self, ids: &[u32]) -> Vec<f32> {
        let mut out = vec![0f32; ids.len() * self.cols];
        out.par_chunks_mut(self.cols.max(1)).zip(ids.par_iter()).for_each(|(o, &r)| {
            let start = r as usize * self.cols;
            for (j, v) in o.iter_mut().enumerate() {
                let i = start + j;
                *v = self.value(i) * self.block_scale(i / BLOCK);
            }
        });
        out
    }

    pub fn dequantize_tensor(&self, device: &candle_core::Device) -> candle_core::Result<Tensor> {
        Tensor::from_vec(self.dequantize(), (self.rows, self.cols), device)
    }

    /// Storage bytes of the quantised weight.
    pub fn bytes(&self) -> usize {
        self.codes.len() + self.absmax_q.len() + 4 * self.scale2.len() + 4
    }
}

/// `y = x @ dequant(W)^T` for a frozen NF4 `W`; backward `dx = dy @ dequant(W)`, never dW.
pub struct Nf4Matmul {
    pub w: Arc<Nf4Weight>,
}

impl CustomOp1 for Nf4Matmul {
    fn name(&self) -> &'static str {
        "nf4-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let (n, k2) = (self.w.rows, self.w.cols);
        if k != k2 {
            candle_core::bail!("nf4-matmul: input has {k} features, weight expects {k2}");
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

/// A GGUF-quantised frozen weight (Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q8_0, ... as stored in the file),
/// used as is: dequantised on the fly in forward and backward, input gradient only.
pub struct GgufMatmul {
    pub w: Arc<candle_core::quantized::QTensor>,
}

impl CustomOp1 for GgufMatmul {
    fn name(&self) -> &'static str {
        "gguf-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let wd = self.w.dequantize(&candle_core::Device::Cpu)?;
        let (n, k2) = wd.dims2()?;
        if k != k2 {
            candle_core::bail!("gguf-matmul: input has {k} features, weight expects {k2}");
        }
        let (ws, wl) = wd.storage_and_layout();
        let candle_core::Storage::Cpu(w) = &*ws else { candle_core::bail!("gguf-matmul: weight is not on the CPU") };
        let out = x.matmul(w, (1, m, n, k), xl, &wl.transpose(0, 1)?)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(dy.matmul(&self.w.dequantize(x.device())?)?))
    }
}

/// An NF4 weight held on a GPU as it is on the CPU: packed codes (0.5 byte per weight), 8-bit
/// block scales with their per-256 f32 scales. Dequantised with tensor ops on the device.
pub struct Nf4OnDevice {
    rows: usize,
    cols: usize,
    /// [nblocks * BLOCK / 2] u8, two codes per byte (first in the low nibble); padded with zeros' code.
    codes: Tensor,
    /// [nsb, SCALE_BLOCK] u8: the i8 block scales + 128, padded to whole scale blocks.
    absmax_q: Tensor,
    /// [nsb, 1] f32: each scale block's scale.
    scale2: Tensor,
    offset: f32,
    table: Tensor,
}

impl Nf4OnDevice {
    pub fn upload(w: &Nf4Weight, device: &candle_core::Device) -> candle_core::Result<Self> {
        let nblocks = (w.rows * w.cols).div_ceil(BLOCK);
        let nsb = nblocks.div_ceil(SCALE_BLOCK);
        let mut codes = w.codes.clone();
        codes.resize(nblocks * BLOCK / 2, 0x77);
        let mut aq: Vec<u8> = w.absmax_q.iter().map(|&a| (a as i16 + 128) as u8).collect();
        aq.resize(nsb * SCALE_BLOCK, 128);
        let s2 = w.scale2.clone();
        Ok(Nf4OnDevice {
            rows: w.rows,
            cols: w.cols,
            codes: Tensor::from_vec(codes, nblocks * BLOCK / 2, device)?,
            absmax_q: Tensor::from_vec(aq, (nsb, SCALE_BLOCK), device)?,
            scale2: Tensor::from_vec(s2, (nsb, 1), device)?,
            offset: w.offset,
            table: Tensor::new(&NF4, device)?,
        })
    }

    pub fn bytes(&self) -> usize {
        self.codes.elem_count() + self.absmax_q.elem_count() + 4 * self.scale2.elem_count() + 4
    }

    /// The dense weight [rows, cols] in `dtype`, on the device.
    pub fn dense(&self, dtype: candle_core::DType) -> candle_core::Result<Tensor> {
        use candle_core::DType;
        let n = self.rows * self.cols;
        let nblocks = n.div_ceil(BLOCK);
        let centred = ((self.absmax_q.to_dtype(DType::F32)? - 128.0)? * (1.0 / 127.0f32) as f64)?;
        let absmax = (centred.broadcast_mul(&self.scale2)? + self.offset as f64)?
            .flatten_all()?
            .narrow(0, 0, nblocks)?
            .reshape((nblocks, 1))?;
        let c = self.codes.to_dtype(DType::F32)?;
        let hi = (&c / 16.0)?.floor()?;
        let lo = (c - (&hi * 16.0)?)?;
        let idx = Tensor::stack(&[lo, hi], 1)?.flatten_all()?.to_dtype(DType::U32)?;
        let v = self.table.index_select(&idx, 0)?.reshape((nblocks, BLOCK))?.broadcast_mul(&absmax)?;
        v.flatten_all()?.narrow(0, 0, n)?.reshape((self.rows, self.cols))?.to_dtype(dtype)
    }
}

/// A frozen quantised weight on a GPU: NF4 (re-quantised at load) or a GGUF file's own blocks.
#[derive(Clone)]
pub enum QuantOnDevice {
    Nf4(Arc<Nf4OnDevice>),
    Gguf(Arc<candle_core::quantized::QTensor>),
}

impl QuantOnDevice {
    pub fn gguf(q: &candle_core::quantized::QTensor, device: &candle_core::Device) -> candle_core::Result<Self> {
        let data = q.data()?;
        let storage = candle_core::quantized::QStorage::from_data(data, device, q.dtype())?;
        Ok(QuantOnDevice::Gguf(Arc::new(candle_core::quantized::QTensor::new(storage, q.shape().clone())?)))
    }

    pub fn dense(&self, device: &candle_core::Device, dtype: candle_core::DType) -> candle_core::Result<Tensor> {
        match self {
            QuantOnDevice::Nf4(w) => w.dense(dtype),
            QuantOnDevice::Gguf(q) => q.dequantize(device)?.to_dtype(dtype),
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            QuantOnDevice::Nf4(w) => w.bytes(),
            QuantOnDevice::Gguf(q) => q.storage_size_in_bytes(),
        }
    }
}

/// `y = x @ dequant(W)^T` on a GPU: the dense weight exists only for the one matmul (forward) and
/// again for `dx = dy @ dequant(W)` (backward, no weight gradient).
pub struct QuantMatmulOnDevice {
    pub w: QuantOnDevice,
}

impl CustomOp1 for QuantMatmulOnDevice {
    fn name(&self) -> &'static str {
        "quant-matmul-device"
    }

    fn cpu_fwd(&self, _x: &CpuStorage, _l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("quant-matmul-device: the input is on the CPU, the weight on a GPU")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let device = candle_core::Device::Cuda(x.device().clone());
        let wd = self.w.dense(&device, x.dtype())?;
        crate::train::graph::FrozenMatmul { w: wd }.cuda_fwd(x, xl)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(dy.matmul(&self.w.dense(x.device(), dy.dtype())?)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn gaussian(n: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::split::SplitMix64::new(seed);
        (0..n).map(|_| (r.normal() * 0.02) as f32).collect()
    }

    #[test]
    fn codes_are_the_papers_and_round_trip_is_bounded() {
        assert_eq!(NF4.len(), 16);
        assert_eq!(NF4[7], 0.0);
        assert!(NF4.windows(2).all(|w| w[0] < w[1]));
        for (i, &c) in NF4.iter().enumerate() {
            assert_eq!(nearest(c) as usize, i, "each code value maps to itself");
        }
        let w = gaussian(64 * 300, 1);
        let q = Nf4Weight::quantize(&w, 300, 64);
        let d = q.dequantize();
        // Per block the error is at most half the widest code gap times the block absmax
        // (plus the 8-bit scale error).
        let max_gap = NF4.windows(2).map(|p| p[1] - p[0]).fold(0f32, f32::max);
        for b in 0..300 {
            let blk = &w[b * 64..(b + 1) * 64];
            let absmax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (x, y) in blk.iter().zip(&d[b * 64..(b + 1) * 64]) {
                assert!((x - y).abs() <= absmax * (max_gap / 2.0 + 0.02), "block {b}: {x} vs {y}");
            }
        }
        let mse: f32 = w.iter().zip(&d).map(|(a, b)| (a - b).powi(2)).sum::<f32>() / w.len() as f32;
        let var: f32 = w.iter().map(|a| a * a).sum::<f32>() / w.len() as f32;
        assert!(mse / var < 0.02, "relative MSE {}", mse / var);
        assert!((q.bytes() as f64 / w.len() as f64) < 0.6, "bytes per parameter {}", q.bytes() as f64 / w.len() as f64);
    }

    #[test]
    fn double_quantised_scales_round_trip() {
        let w = gaussian(64 * 1000, 2);
        let q = Nf4Weight::quantize(&w, 1000, 64);
        for b in 0..1000 {
            let absmax = w[b * 64..(b + 1) * 64].iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = q.block_scale(b);
            assert!(
                (s - absmax).abs() <= q.scale2[b / SCALE_BLOCK] / 127.0 * 0.51 + 1e-7,
                "block {b}: {s} vs {absmax}"
            );
        }
    }

    #[test]
    fn the_gpu_form_dequantises_exactly_as_the_cpu() {
        // Sizes that leave a partial block and a partial scale block (padding on upload).
        for (rows, cols) in [(48, 64), (300, 64), (7, 100)] {
            let q = Nf4Weight::quantize(&gaussian(rows * cols, 6), rows, cols);
            let on = Nf4OnDevice::upload(&q, &Device::Cpu).unwrap();
            let d = on.dense(candle_core::DType::F32).unwrap();
            assert_eq!(d.dims(), &[rows, cols]);
            assert_eq!(d.flatten_all().unwrap().to_vec1::<f32>().unwrap(), q.dequantize(), "{rows}x{cols}");
            assert!((on.bytes() as f64 / (rows * cols) as f64) < 0.6 || rows * cols < 256 * 64);
        }
    }

    #[test]
    fn row_lookup_equals_the_dense_rows() {
        let (rows, cols) = (40, 72); // rows straddle 64-blocks
        let q = Nf4Weight::quantize(&gaussian(rows * cols, 8), rows, cols);
        let dense = q.dequantize();
        let got = q.dequantize_rows(&[3, 0, 39, 3]);
        for (k, &r) in [3usize, 0, 39, 3].iter().enumerate() {
            assert_eq!(&got[k * cols..(k + 1) * cols], &dense[r * cols..(r + 1) * cols]);
        }
    }

    #[test]
    fn input_gradient_equals_dequantise_then_matmul() {
        let w = gaussian(48 * 64, 3);
        let q = Arc::new(Nf4Weight::quantize(&w, 48, 64));
        let wd = q.dequantize_tensor(&Device::Cpu).unwrap();
        let x = Var::from_tensor(&Tensor::from_vec(gaussian(5 * 64, 4), (5, 64), &Device::Cpu).unwrap()).unwrap();
        let probe = Tensor::from_vec(gaussian(5 * 48, 5), (5, 48), &Device::Cpu).unwrap();
        let y1 = x.as_tensor().apply_op1(Nf4Matmul { w: q.clone() }).unwrap();
        let y2 = x.as_tensor().matmul(&wd.t().unwrap()).unwrap();
        assert_eq!(y1.to_vec2::<f32>().unwrap(), y2.to_vec2::<f32>().unwrap());
        let g1 = (&y1 * &probe).unwrap().sum_all().unwrap().backward().unwrap().get(x.as_tensor()).unwrap().clone();
        let g2 = (&y2 * &probe).unwrap().sum_all().unwrap().backward().unwrap().get(x.as_tensor()).unwrap().clone();
        assert_eq!(
            g1.to_vec2::<f32>().unwrap(),
            g2.to_vec2::<f32>().unwrap(),
            "input gradient equals the dense one exactly"
        );
    }
}
