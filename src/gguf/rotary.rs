//! q_proj/k_proj rows between Hugging Face's layout (each head's two rotary halves one after the
//! other) and llama.cpp's rotary order (the halves interleaved), for f32 tensors and for quantised
//! matrices moved whole row by row.

use anyhow::Result;
use candle_core::quantized::{QStorage, QTensor};
use candle_core::{Device, Tensor};

/// llama.cpp's rotary row order back to Hugging Face's: HF row `h*hd + b*hd/2 + a` is GGUF row
/// `h*hd + 2a + b`.
pub fn unpermute_rows(rows: usize, n_head: usize) -> Vec<usize> {
    let hd = rows / n_head;
    let mut src = vec![0; rows];
    for h in 0..n_head {
        for a in 0..hd / 2 {
            for b in 0..2 {
                src[h * hd + b * (hd / 2) + a] = h * hd + 2 * a + b;
            }
        }
    }
    src
}

/// Undoes llama.cpp's rotary row permutation of a q_proj/k_proj weight.
pub fn from_gguf(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    Ok(w.reshape((n_head, out / n_head / 2, 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

/// Rows of a q or k matrix (or its LoRA B) in llama.cpp's rotary order.
pub fn to_gguf(b: &Tensor, n_head: usize) -> Result<Tensor> {
    let rows = b.dims()[0];
    let mut dst = vec![0u32; rows];
    for (hf, &g) in unpermute_rows(rows, n_head).iter().enumerate() {
        dst[g] = hf as u32;
    }
    Ok(b.index_select(&Tensor::from_vec(dst, rows, b.device())?, 0)?)
}

/// Reorders whole rows of a quantised matrix (rows are independent runs of blocks), without
/// re-quantising: `out[r] = in[src[r]]`.
pub fn permute_rows(q: &QTensor, src: &[usize]) -> candle_core::Result<QTensor> {
    let (rows, cols) = q.shape().dims2()?;
    let dtype = q.dtype();
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    let mut out = vec![0u8; rows * row_bytes];
    for (r, &s) in src.iter().enumerate() {
        out[r * row_bytes..(r + 1) * row_bytes].copy_from_slice(&data[s * row_bytes..(s + 1) * row_bytes]);
    }
    let storage = QStorage::from_data(std::borrow::Cow::Owned(out), &Device::Cpu, dtype)?;
    QTensor::new(storage, (rows, cols))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotary_order_is_the_inverse_of_the_loaders_unpermutation() {
        // 2 heads of head_dim 4: llama.cpp interleaves the two halves of each head.
        let b = Tensor::arange(0f32, 8.0, &Device::Cpu).unwrap().reshape((8, 1)).unwrap();
        let g = to_gguf(&b, 2).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(g, vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
        let src = unpermute_rows(8, 2);
        let back: Vec<f32> = src.iter().map(|&s| g[s]).collect();
        assert_eq!(back, (0..8).map(|x| x as f32).collect::<Vec<_>>());
        // And the tensor form undoes it too.
        let w = Tensor::from_vec(g, (8, 1), &Device::Cpu).unwrap();
        let hf = from_gguf(&w, 2).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(hf, (0..8).map(|x| x as f32).collect::<Vec<_>>());
    }
}
