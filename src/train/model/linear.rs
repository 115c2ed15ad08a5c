//! A frozen linear layer (`y = x W^T + b`) with an optional LoRA adapter. The frozen weight is held
//! one of four ways ([`Weight`]): dense, NF4 (QLoRA), a GGUF file's own quantised blocks, the two
//! with a copy on the GPU when training there, or a checkpoint's MXFP4 blocks (gpt-oss's experts). Whatever the form, its matmul is an op
//! whose backward returns only the input gradient (`graph::FrozenMatmul` and the quantised ones
//! in [`super::quant`]): the base never gets a weight gradient, except in full fine-tuning, where
//! a dense weight is a variable and its matmul is `graph::trained_matmul`.

use super::mxfp4::{Mxfp4Matmul, Mxfp4Weight};
use super::quant::{GgufMatmul, Nf4Matmul, Nf4OnDevice, Nf4Weight, QuantMatmulOnDevice, QuantOnDevice};
use crate::split::SplitMix64;
use crate::train::adapters::dora::{dora_linear, dora_norm};
use crate::train::adapters::lora::{dropout_mask, lora_linear, Lora, LoraSettings};
use crate::train::adapters::lora_init;
use crate::train::graph::{trained_matmul, BaseOp, FrozenMatmul};
use anyhow::{Context, Result};
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

/// How a frozen weight [out, in] is held.
pub enum Weight {
    Dense(Tensor),
    /// NormalFloat4 (QLoRA), with its codes on the GPU when training there.
    Nf4 {
        cpu: Arc<Nf4Weight>,
        gpu: Option<QuantOnDevice>,
    },
    /// A GGUF file's blocks as stored (QLoRA on a GGUF base, no re-quantisation).
    Gguf {
        cpu: Arc<QTensor>,
        gpu: Option<QuantOnDevice>,
    },
    /// A checkpoint's MXFP4 blocks as stored (QLoRA on gpt-oss's experts; CPU only).
    Mxfp4(Arc<Mxfp4Weight>),
}

pub struct Linear {
    /// Hugging Face module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    pub weight: Weight,
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
    /// Where the layer computes (a quantised weight's CPU form may live elsewhere).
    pub device: Device,
}

impl Linear {
    /// A dense frozen layer.
    pub fn new(name: String, w: Tensor, bias: Option<Tensor>) -> Self {
        let device = w.device().clone();
        Linear { name, weight: Weight::Dense(w), bias, lora: None, device }
    }

    /// A layer over a weight held quantised, computing on `device`.
    pub fn quantised(name: String, weight: Weight, device: &Device) -> Self {
        Linear { name, weight, bias: None, lora: None, device: device.clone() }
    }

    /// (out, in) features.
    pub fn dims(&self) -> candle_core::Result<(usize, usize)> {
        match &self.weight {
            Weight::Dense(w) => w.dims2(),
            Weight::Nf4 { cpu, .. } => Ok((cpu.rows, cpu.cols)),
            Weight::Gguf { cpu, .. } => cpu.shape().dims2(),
            Weight::Mxfp4(w) => Ok((w.rows, w.cols)),
        }
    }

    /// (parameters, bytes) of the frozen weight as held: on the GPU, as NF4, as GGUF blocks, or dense.
    pub fn held(&self) -> (usize, usize) {
        let (r, c) = self.dims().unwrap_or((0, 0));
        let bytes = match &self.weight {
            Weight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            Weight::Nf4 { gpu: Some(d), .. } | Weight::Gguf { gpu: Some(d), .. } => d.bytes(),
            Weight::Nf4 { cpu, gpu: None } => cpu.bytes(),
            Weight::Gguf { cpu, gpu: None } => cpu.storage_size_in_bytes(),
            Weight::Mxfp4(w) => w.bytes(),
        };
        (r * c, bytes)
    }

    /// The frozen weight as a dense tensor on the layer's device (dequantised if needed).
    pub fn dense_weight(&self) -> candle_core::Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => Ok(w.clone()),
            Weight::Nf4 { cpu, .. } => cpu.dequantize_tensor(&self.device),
            Weight::Gguf { cpu, .. } => cpu.dequantize(&self.device),
            Weight::Mxfp4(w) => w.dequantize_tensor(&self.device),
        }
    }

    /// The frozen weight, dense, in `x`'s dtype on `x`'s device (dequantised where it is held
    /// quantised; the dense weight itself otherwise, no copy).
    pub fn frozen_dense(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.on_device() {
            Some(d) if !x.device().is_cpu() => d.dense(x.device(), x.dtype()),
            _ => self.dense_weight()?.to_dtype(x.dtype()),
        }
    }

    fn on_device(&self) -> Option<&QuantOnDevice> {
        match &self.weight {
            Weight::Nf4 { gpu, .. } | Weight::Gguf { gpu, .. } => gpu.as_ref(),
            Weight::Dense(_) | Weight::Mxfp4(_) => None,
        }
    }

    /// Adds a fresh adapter (PEFT's initialisation) drawn from `rng` (PiSSA/OLoRA then replace it:
    /// [`Linear::start_from_factors`]).
    pub fn add_lora(&mut self, s: &LoraSettings, rng: &mut SplitMix64) -> Result<()> {
        let (out, inp) = self.dims()?;
        let mut l = Lora::new(out, inp, s, rng, &self.device)?;
        if s.use_dora {
            // DoRA starts from the weight's own row norms (B is zero): the layer is unchanged.
            l.magnitude = Some(candle_core::Var::from_tensor(&dora_norm(&self.dense_weight()?, &l)?)?);
        }
        self.lora = Some(l);
        Ok(())
    }

    /// PiSSA/OLoRA: A and B from the weight's factors ([`lora_init::factors`]), the frozen weight
    /// replaced by `W - s B A` (in f32, then back to the weight's own form: its dtype, or NF4
    /// re-quantised, as PEFT re-quantises a 4-bit base).
    pub fn start_from_factors(&mut self, s: &LoraSettings, rng: &mut SplitMix64) -> Result<()> {
        if matches!(self.weight, Weight::Gguf { .. } | Weight::Mxfp4(_)) {
            anyhow::bail!(
                "{}: --lora-init {} rewrites the base weight as a residual; a GGUF file's or MXFP4 quantised \
                 blocks are not re-quantised (use --qlora nf4, or no --qlora)",
                self.name,
                s.init.peft_name()
            );
        }
        let (out, inp) = self.dims()?;
        let cpu = candle_core::Device::Cpu;
        let w = self.dense_weight()?.to_device(&cpu)?.to_dtype(DType::F32)?;
        let (a, b) = lora_init::factors(&w.flatten_all()?.to_vec1()?, (out, inp), s.r, s.scale(), s.init, rng)
            .map_err(|e| anyhow::anyhow!("{}: {e}", self.name))?;
        let (a, b) = (Tensor::from_vec(a, (s.r, inp), &cpu)?, Tensor::from_vec(b, (out, s.r), &cpu)?);
        let residual = (&w - (b.matmul(&a)? * s.scale())?)?;
        self.weight = match &self.weight {
            Weight::Dense(old) => Weight::Dense(residual.to_dtype(old.dtype())?.to_device(old.device())?),
            Weight::Nf4 { gpu, .. } => {
                let q = Nf4Weight::quantize(&residual.flatten_all()?.to_vec1()?, out, inp);
                let gpu = match gpu {
                    Some(_) => Some(QuantOnDevice::Nf4(Arc::new(Nf4OnDevice::upload(&q, &self.device)?))),
                    None => None,
                };
                Weight::Nf4 { cpu: Arc::new(q), gpu }
            }
            Weight::Gguf { .. } | Weight::Mxfp4(_) => unreachable!("refused above"),
        };
        let (a, b) = (a.to_device(&self.device)?, b.to_device(&self.device)?);
        let l = self.lora.as_mut().context("PiSSA/OLoRA start an adapter the layer has")?;
        l.a.set(&a)?;
        l.b.set(&b)?;
        l.initial = Some((a, b));
        Ok(())
    }

    /// x [tokens, in] -> [tokens, out]. `rng` drives dropout when training.
    pub fn forward(&self, x: &Tensor, train_rng: Option<&mut SplitMix64>) -> candle_core::Result<Tensor> {
        self.forward_shared(&Shared::new(x), train_rng)
    }

    /// As `forward`, for an input that several projections read (q/k/v, gate/up): the adapters'
    /// f32 copy of it is made once. With an adapter, one graph node over (x, A, B)
    /// ([`lora_linear`]): the adapter computes in f32 (its weights' dtype) and adds back in the
    /// compute dtype, as PEFT.
    pub fn forward_shared(&self, input: &Shared, train_rng: Option<&mut SplitMix64>) -> candle_core::Result<Tensor> {
        let x = input.x;
        if let Weight::Dense(w) = &self.weight {
            if w.is_variable() {
                // Full fine-tuning: the weight (and bias) trained, no adapter.
                let y = trained_matmul(x, w)?;
                return match &self.bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                };
            }
        }
        let base = self.base_op(x);
        if let Some((l, (a0, b0))) =
            self.lora.as_ref().filter(|l| !l.enabled.get()).and_then(|l| Some((l, l.initial.as_ref()?)))
        {
            // Off, a PiSSA/OLoRA layer is its residual plus the initial factors: the base itself.
            return lora_linear(x, input.f32()?, base, self.bias.as_ref(), (a0, b0, l.scale), None);
        }
        if let Some(l) = self.lora.as_ref().filter(|l| l.enabled.get()) {
            let mask = match train_rng {
                Some(rng) if l.dropout > 0.0 => Some(dropout_mask(x, l.dropout, rng)?),
                _ => None,
            };
            if let Some(m) = &l.magnitude {
                let product = |t: &Tensor| t.contiguous()?.apply_op1_arc(base.clone());
                return dora_linear(x, &product, &self.frozen_dense(x)?, self.bias.as_ref(), l, m, mask);
            }
            return lora_linear(
                x,
                input.f32()?,
                base,
                self.bias.as_ref(),
                (l.a.as_tensor(), l.b.as_tensor(), l.scale),
                mask,
            );
        }
        let y = x.contiguous()?.apply_op1_arc(base)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// The frozen weight's matmul for an input on `x`'s device: quantised on the GPU, GGUF blocks,
    /// NF4 or dense.
    fn base_op(&self, x: &Tensor) -> BaseOp {
        match (&self.weight, self.on_device()) {
            (_, Some(w)) if !x.device().is_cpu() => Arc::new(Box::new(QuantMatmulOnDevice { w: w.clone() })),
            (Weight::Gguf { cpu, .. }, _) => Arc::new(Box::new(GgufMatmul { w: cpu.clone() })),
            (Weight::Nf4 { cpu, .. }, _) => Arc::new(Box::new(Nf4Matmul { w: cpu.clone() })),
            (Weight::Mxfp4(w), _) => Arc::new(Box::new(Mxfp4Matmul { w: w.clone() })),
            (Weight::Dense(w), _) => Arc::new(Box::new(FrozenMatmul { w: w.clone() })),
        }
    }

    /// W + s * B A, for merging; with DoRA each row then scaled to its magnitude,
    /// `m / ||W + s B A|| * (W + s B A)`.
    pub fn merged_weight(&self) -> candle_core::Result<Tensor> {
        let Some(l) = &self.lora else { return self.dense_weight() };
        let w = self.dense_weight()?;
        let merged = (&w + (l.b.as_tensor().matmul(l.a.as_tensor())? * l.scale)?.to_dtype(w.dtype())?)?;
        match &l.magnitude {
            Some(m) => {
                let g = m.as_tensor().broadcast_div(&dora_norm(&w, l)?)?.unsqueeze(1)?;
                merged.to_dtype(DType::F32)?.broadcast_mul(&g)?.to_dtype(w.dtype())
            }
            None => Ok(merged),
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
