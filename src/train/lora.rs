//! LoRA on a frozen linear layer, as PEFT defines it: `y = x W^T (+ b) + (dropout(x) A^T B^T) * s`
//! with A [r, in] initialised Kaiming-uniform (a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))),
//! B [out, r] zeros, and s = alpha / r (alpha / sqrt(r) with rsLoRA). Only A and B are variables.

use crate::split::SplitMix64;
use anyhow::Result;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoraSettings {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub rslora: bool,
    /// Module names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj).
    pub targets: Vec<String>,
}

pub const ALL_LINEAR: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

impl LoraSettings {
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
    /// `all-linear` or a comma list.
    pub fn parse_targets(spec: &str) -> Result<Vec<String>> {
        if spec == "all-linear" || spec == "all" {
            return Ok(ALL_LINEAR.iter().map(|s| s.to_string()).collect());
        }
        let t: Vec<String> = spec.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        for x in &t {
            if !ALL_LINEAR.contains(&x.as_str()) {
                anyhow::bail!("--target: unknown module '{x}' (use {} or all-linear)", ALL_LINEAR.join(","));
            }
        }
        Ok(t)
    }
}

pub struct Lora {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
    pub dropout: f64,
    /// Off = the base model alone (DPO's reference model without a second copy in memory).
    pub enabled: std::cell::Cell<bool>,
}

pub struct Linear {
    /// Hugging Face module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    /// The dense frozen weight [out, in]; empty when the weight is held in NF4 (`q`).
    pub w: Tensor,
    pub q: Option<std::sync::Arc<super::quant::Nf4Weight>>,
    /// The weight as stored in a GGUF file (QLoRA on a GGUF base, no re-quantisation).
    pub gq: Option<std::sync::Arc<candle_core::quantized::QTensor>>,
    /// `q` or `gq` uploaded to the GPU when training there.
    pub dq: Option<super::quant::QuantOnDevice>,
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
}

impl Linear {
    pub fn new(name: String, w: Tensor, bias: Option<Tensor>) -> Self {
        Linear { name, w, bias, q: None, gq: None, dq: None, lora: None }
    }

    /// (out, in) features.
    pub fn dims(&self) -> candle_core::Result<(usize, usize)> {
        if let Some(g) = &self.gq {
            return g.shape().dims2();
        }
        match &self.q {
            Some(q) => Ok((q.rows, q.cols)),
            None => self.w.dims2(),
        }
    }

    /// (parameters, bytes) of the frozen weight as held: on the GPU, as NF4, as GGUF blocks, or dense.
    pub fn held(&self) -> (usize, usize) {
        let (r, c) = self.dims().unwrap_or((0, 0));
        let bytes = match (&self.dq, &self.q, &self.gq) {
            (Some(d), _, _) => d.bytes(),
            (None, _, Some(g)) => g.storage_size_in_bytes(),
            (None, Some(q), None) => q.bytes(),
            (None, None, None) => self.w.elem_count() * self.w.dtype().size_in_bytes(),
        };
        (r * c, bytes)
    }

    /// The frozen weight as a dense tensor (dequantised if needed).
    pub fn dense_weight(&self) -> candle_core::Result<Tensor> {
        if let Some(g) = &self.gq {
            return g.dequantize(self.w.device());
        }
        match &self.q {
            Some(q) => q.dequantize_tensor(self.w.device()),
            None => Ok(self.w.clone()),
        }
    }

    /// Adds a fresh adapter (PEFT's initialisation) drawn from `rng`.
    pub fn add_lora(&mut self, s: &LoraSettings, rng: &mut SplitMix64) -> Result<()> {
        let (out, inp) = self.dims()?;
        let bound = 1.0 / (inp as f64).sqrt();
        let a: Vec<f32> = (0..s.r * inp)
            .map(|_| ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * bound as f32)
            .collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (s.r, inp), self.w.device())?)?;
        let b = Var::from_tensor(&Tensor::zeros((out, s.r), DType::F32, self.w.device())?)?;
        self.lora = Some(Lora { a, b, scale: s.scale(), dropout: s.dropout, enabled: std::cell::Cell::new(true) });
        Ok(())
    }

    /// x [tokens, in] -> [tokens, out]. `rng` drives dropout when training.
    pub fn forward(&self, x: &Tensor, train_rng: Option<&mut SplitMix64>) -> candle_core::Result<Tensor> {
        self.forward_shared(&Shared::new(x), train_rng)
    }

    /// As `forward`, for an input that several projections read (q/k/v, gate/up): the adapters'
    /// f32 copy of it is made once. With an adapter, one graph node over (x, A, B)
    /// ([`super::fused::lora_linear`]): the adapter computes in f32 (its weights' dtype) and adds
    /// back in the compute dtype, as PEFT.
    pub fn forward_shared(&self, input: &Shared, train_rng: Option<&mut SplitMix64>) -> candle_core::Result<Tensor> {
        let x = input.x;
        let base = self.base_op(x);
        if let Some(l) = self.lora.as_ref().filter(|l| l.enabled.get()) {
            let mask = match train_rng {
                Some(rng) if l.dropout > 0.0 => Some(dropout_mask(x, l.dropout, rng)?),
                _ => None,
            };
            let lora = (l.a.as_tensor(), l.b.as_tensor(), l.scale);
            return super::fused::lora_linear(x, input.f32()?, base, self.bias.as_ref(), lora, mask);
        }
        let y = x.contiguous()?.apply_op1_arc(base)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// The frozen weight, dense, in `x`'s dtype on `x`'s device (dequantised where it is held
    /// quantised; the dense weight itself otherwise, no copy).
    pub fn frozen_dense(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.dq {
            Some(d) if !x.device().is_cpu() => d.dense(x.device(), x.dtype()),
            _ => self.dense_weight()?.to_dtype(x.dtype()),
        }
    }

    /// The frozen weight's matmul for an input on `x`'s device: quantised on the GPU, GGUF blocks,
    /// NF4 or dense.
    fn base_op(&self, x: &Tensor) -> super::fused::BaseOp {
        use super::quant::{GgufMatmul, Nf4Matmul, QuantMatmulOnDevice};
        match (&self.dq, &self.q, &self.gq) {
            (Some(w), _, _) if !x.device().is_cpu() => {
                std::sync::Arc::new(Box::new(QuantMatmulOnDevice { w: w.clone() }))
            }
            (_, _, Some(g)) => std::sync::Arc::new(Box::new(GgufMatmul { w: g.clone() })),
            (_, Some(q), None) => std::sync::Arc::new(Box::new(Nf4Matmul { w: q.clone() })),
            (_, None, None) => std::sync::Arc::new(Box::new(super::ops::FrozenMatmul { w: self.w.clone() })),
        }
    }

    /// W + s * B A, for merging.
    pub fn merged_weight(&self) -> candle_core::Result<Tensor> {
        match &self.lora {
            Some(l) => self.dense_weight()? + (l.b.as_tensor().matmul(l.a.as_tensor())? * l.scale)?,
            None => self.dense_weight(),
        }
    }
}

/// A layer input with its f32 copy for the adapters, made on first use.
pub struct Shared<'a> {
    pub x: &'a Tensor,
    x32: std::cell::OnceCell<Tensor>,
}

impl<'a> Shared<'a> {
    pub fn new(x: &'a Tensor) -> Self {
        Shared { x, x32: std::cell::OnceCell::new() }
    }

    fn f32(&self) -> candle_core::Result<&Tensor> {
        if self.x32.get().is_none() {
            let _ = self.x32.set(self.x.detach().to_dtype(DType::F32)?);
        }
        Ok(self.x32.get().expect("just set"))
    }
}

/// Inverted-dropout mask (0 or 1/(1-p)) shaped as `x`, in f32, drawn from `rng` (reproducible
/// across resumes).
fn dropout_mask(x: &Tensor, p: f64, rng: &mut SplitMix64) -> candle_core::Result<Tensor> {
    let keep = (1.0 / (1.0 - p)) as f32;
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 >= p { keep } else { 0.0 })
        .collect();
    Tensor::from_vec(mask, x.shape(), x.device())
}
