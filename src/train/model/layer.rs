//! One decoder layer's weights as its family lays them out ([`Layer`]): the attention's input
//! projections (q, k, v, or Phi-3's fused qkv), its output, the MLP (dense: gate and up, or fused,
//! and down; or a mixture of experts, [`super::moe`]), the norms the family has and the q/k norms;
//! and their loading from a base by Hugging Face names, each checked against the shape the config
//! gives it ([`Loader`]; a sparse block's experts from per-expert, stacked or transformers' fused
//! tensors, a missing expert named).

use super::base::{nf4_of, BaseModel};
use super::config::ModelConfig;
use super::family::{Arch, ExpertStorage, Family, LayerPlan, Moe, QkNorm};
use super::linear::{Linear, Weight};
use super::moe::{Expert, SparseMlp};
use super::mxfp4;
use super::quant::{Nf4OnDevice, Nf4Weight, QuantOnDevice};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

pub struct Layer {
    /// [q, k, v], or [qkv] where the family fuses them.
    pub qkv: Vec<Linear>,
    pub o: Linear,
    pub mlp: Mlp,
    /// Norm weights as applied (the family's offset added): before attention, after it, before the
    /// MLP, after it; absent where the family has none.
    pub norms: [Option<Tensor>; 4],
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    /// Attention sinks [Hq] in f32, where the family has them (gpt-oss).
    pub sinks: Option<Tensor>,
    pub plan: LayerPlan,
    /// Its place in the model.
    pub index: usize,
}

/// A layer's MLP.
pub enum Mlp {
    /// [gate, up] (or [gate_up] where the family fuses them) and down.
    Dense {
        gate_up: Vec<Linear>,
        down: Linear,
    },
    Sparse(SparseMlp),
}

impl Layer {
    /// Every projection LoRA adapts as a module (target_modules), in PEFT's order: attention and a
    /// dense MLP (a sparse block's experts are adapted as parameters, [`SparseMlp::add_lora`]).
    pub fn linears(&self) -> Vec<&Linear> {
        let mlp: Vec<&Linear> = match &self.mlp {
            Mlp::Dense { gate_up, down } => gate_up.iter().chain([down]).collect(),
            Mlp::Sparse(_) => vec![],
        };
        self.qkv.iter().chain([&self.o]).chain(mlp).collect()
    }
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mlp: Vec<&mut Linear> = match &mut self.mlp {
            Mlp::Dense { gate_up, down } => gate_up.iter_mut().chain([down]).collect(),
            Mlp::Sparse(_) => vec![],
        };
        self.qkv.iter_mut().chain([&mut self.o]).chain(mlp).collect()
    }

    /// Every frozen projection, a sparse block's router and experts included.
    pub fn frozen(&self) -> Vec<&Linear> {
        let mut all = self.linears();
        if let Mlp::Sparse(s) = &self.mlp {
            all.extend(s.frozen());
        }
        all
    }

    /// Every trained variable of the layer (in `Model::lora_vars` order): its adapters' A and B, then
    /// a trained router.
    pub fn trained_vars(&self) -> Vec<&candle_core::Var> {
        let mut out: Vec<&candle_core::Var> =
            self.loras().into_iter().flat_map(|l| [&l.a, &l.b].into_iter().chain(l.magnitude.as_ref())).collect();
        if let Mlp::Sparse(s) = &self.mlp {
            if let Some(r) = &s.trained_router {
                out.push(&r.weight);
                out.extend(r.bias.as_ref());
            }
        }
        out
    }

    /// Every adapter of the layer: its modules' and its experts' (in `Model::lora_vars` order).
    pub fn loras(&self) -> Vec<&crate::train::adapters::lora::Lora> {
        let mut out: Vec<_> = self.linears().into_iter().filter_map(|l| l.lora.as_ref()).collect();
        if let Mlp::Sparse(s) = &self.mlp {
            for (_, per_expert) in s.adapters() {
                out.extend(per_expert);
            }
        }
        out
    }
}

/// Reads a base's tensors onto a device in a dtype, the family's norm offset added.
pub struct Loader<'a> {
    pub base: &'a BaseModel,
    pub device: &'a Device,
    pub dtype: DType,
    pub family: &'static Family,
}

impl Loader<'_> {
    /// A full-precision tensor by Hugging Face name.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        Ok(self.base.get(name)?.to_dtype(self.dtype)?.to_device(self.device)?)
    }

    /// A norm weight as applied (w + the family's offset) of `len` values.
    pub fn norm(&self, module: &str, len: usize) -> Result<Tensor> {
        let name = format!("{module}.weight");
        let w = self.base.get(&name)?;
        self.check(&name, w.dims(), &[len])?;
        let w = match self.family.norm_offset {
            0.0 => w.clone(),
            o => (w.to_dtype(DType::F32)? + o)?,
        };
        Ok(w.to_dtype(self.dtype)?.to_device(self.device)?)
    }

    /// Attention sinks [heads] in f32.
    fn sinks(&self, name: &str, heads: usize) -> Result<Tensor> {
        let w = self.base.get(name)?;
        self.check(name, w.dims(), &[heads])?;
        Ok(w.to_dtype(DType::F32)?.to_device(self.device)?)
    }

    pub(super) fn check(&self, name: &str, got: &[usize], want: &[usize]) -> Result<()> {
        if got != want {
            bail!(
                "{}: {name} is {got:?} but the config makes it {want:?}: the config and the weights disagree \
                 (a config.json from another model?)",
                self.base.source.display()
            );
        }
        Ok(())
    }

    /// NF4 codes uploaded to a GPU (none on the CPU).
    pub fn nf4_on_device(&self, q: &Arc<Nf4Weight>) -> Result<Option<QuantOnDevice>> {
        if self.device.is_cpu() {
            return Ok(None);
        }
        Ok(Some(QuantOnDevice::Nf4(Arc::new(Nf4OnDevice::upload(q, self.device)?))))
    }

    /// A projection [out, in] by module path, dense or already quantised by a QLoRA load (NF4 or the
    /// GGUF's own blocks), with its bias when `bias`.
    pub fn linear(&self, path: &str, (out, inp): (usize, usize), bias: bool) -> Result<Linear> {
        let (device, base) = (self.device, self.base);
        let held = match (base.nf4.get(path), base.quantized.get(path)) {
            (_, Some(g)) => {
                let gpu = if device.is_cpu() { None } else { Some(QuantOnDevice::gguf(g, device)?) };
                Weight::Gguf { cpu: g.clone(), gpu }
            }
            (Some(q), None) => Weight::Nf4 { cpu: q.clone(), gpu: self.nf4_on_device(q)? },
            (None, None) => Weight::Dense(self.get(&format!("{path}.weight"))?),
        };
        let mut l = match held {
            Weight::Dense(w) => Linear::new(path.to_string(), w, None),
            quantised => Linear::quantised(path.to_string(), quantised, device),
        };
        let (r, c) = l.dims()?;
        self.check(&format!("{path}.weight"), &[r, c], &[out, inp])?;
        if bias {
            l.bias = match base.tensors.get(&format!("{path}.bias")) {
                Some(b) => Some(b.to_dtype(self.dtype)?.to_device(device)?),
                None => None,
            };
        }
        Ok(l)
    }

    /// Layer `i` of a model of shape `c` and architecture `arch`.
    pub fn layer(&self, c: &ModelConfig, arch: &Arch, i: usize) -> Result<Layer> {
        let p = format!("model.layers.{i}");
        let (h, hd, inter) = (c.hidden_size, c.head_dim(), c.intermediate_size);
        let (q, kv) = (c.num_attention_heads * hd, c.kv_heads() * hd);
        let qkv = match self.family.fused {
            true => vec![self.linear(&format!("{p}.self_attn.qkv_proj"), (q + 2 * kv, h), arch.qkv_bias)?],
            false => vec![
                self.linear(&format!("{p}.self_attn.q_proj"), (q, h), arch.qkv_bias)?,
                self.linear(&format!("{p}.self_attn.k_proj"), (kv, h), arch.qkv_bias)?,
                self.linear(&format!("{p}.self_attn.v_proj"), (kv, h), arch.qkv_bias)?,
            ],
        };
        let mlp = match (&arch.moe, arch.layers[i].sparse) {
            (Some(moe), true) => Mlp::Sparse(self.sparse_mlp(i, h, moe)?),
            _ => Mlp::Dense {
                gate_up: match self.family.fused {
                    true => vec![self.linear(&format!("{p}.mlp.gate_up_proj"), (2 * inter, h), false)?],
                    false => vec![
                        self.linear(&format!("{p}.mlp.gate_proj"), (inter, h), false)?,
                        self.linear(&format!("{p}.mlp.up_proj"), (inter, h), false)?,
                    ],
                },
                down: self.linear(&format!("{p}.mlp.down_proj"), (h, inter), false)?,
            },
        };
        let norm = |slot: usize| -> Result<Option<Tensor>> {
            self.family.norms[slot].map(|n| self.norm(&format!("{p}.{n}"), h)).transpose()
        };
        let (qn, kn) = match arch.qk_norm {
            QkNorm::None => (None, None),
            QkNorm::PerHead => (Some(hd), Some(hd)),
            QkNorm::Whole => (Some(q), Some(kv)),
        };
        Ok(Layer {
            qkv,
            // Llama's `attention_bias` biases o_proj too; Qwen2's q/k/v biases leave it without.
            o: self.linear(&format!("{p}.self_attn.o_proj"), (h, q), arch.qkv_bias)?,
            mlp,
            norms: [norm(0)?, norm(1)?, norm(2)?, norm(3)?],
            q_norm: qn.map(|n| self.norm(&format!("{p}.self_attn.q_norm"), n)).transpose()?,
            k_norm: kn.map(|n| self.norm(&format!("{p}.self_attn.k_norm"), n)).transpose()?,
            sinks: match arch.attn_sinks {
                true => Some(self.sinks(&format!("{p}.self_attn.sinks"), c.num_attention_heads)?),
                false => None,
            },
            plan: arch.layers[i],
            index: i,
        })
    }
}

/// gpt-oss's stacked expert weights [E, out, in], dense or as MXFP4 (blocks, scales).
enum ExpertWeights {
    Dense(Tensor),
    Mxfp4(Tensor, Tensor),
}

/// One expert's matrix, taken out of [`ExpertWeights`].
enum Held {
    Dense(Tensor),
    Mxfp4(mxfp4::Mxfp4Weight),
}

impl ExpertWeights {
    /// Expert `x`'s rows: all, or of an interleaved pair the even (`Some(0)`) or odd (`Some(1)`).
    fn rows(&self, x: usize, half: Option<usize>) -> Result<Held> {
        match self {
            ExpertWeights::Dense(t) => {
                let w = t.get(x)?;
                Ok(Held::Dense(match half {
                    None => w,
                    Some(j) => {
                        let (out, inp) = w.dims2()?;
                        w.reshape((out / 2, 2, inp))?.narrow(1, j, 1)?.squeeze(1)?
                    }
                }))
            }
            ExpertWeights::Mxfp4(blocks, scales) => {
                let (b, s) = (blocks.get(x)?, scales.get(x)?);
                let n = b.dim(0)?;
                let rows: Vec<usize> = match half {
                    None => (0..n).collect(),
                    Some(j) => (j..n).step_by(2).collect(),
                };
                Ok(Held::Mxfp4(mxfp4::Mxfp4Weight::from_rows(&b, &s, rows.into_iter())?))
            }
        }
    }
}

impl Loader<'_> {
    /// Layer `i`'s sparse block of mixture `moe`: transformers' fused 3-D experts where the
    /// checkpoint has them, else the family's stored layout; every expert checked for.
    pub fn sparse_mlp(&self, i: usize, h: usize, moe: &Moe) -> Result<SparseMlp> {
        let layout = self.family.moe.context("the family has no experts")?;
        let p = format!("model.layers.{i}");
        let path = format!("{p}.{}", layout.block);
        let (e, inter) = (moe.experts, moe.intermediate);
        let fused = format!("{path}.experts.gate_up_proj");
        let sliced = |name: &str, t: &Tensor, shape: (usize, usize)| -> Result<Vec<Tensor>> {
            let (n, r, c) = t.dims3().with_context(|| format!("{name} is not 3-D"))?;
            if (n, r, c) != (e, shape.0, shape.1) {
                self.check(name, &[n, r, c], &[e, shape.0, shape.1])?;
            }
            Ok((0..e).map(|x| t.get(x)).collect::<candle_core::Result<_>>()?)
        };
        let dense = |name: String, w: Tensor| -> Result<Linear> {
            Ok(Linear::new(name, w.to_dtype(self.dtype)?.to_device(self.device)?, None))
        };
        let expert_name = |x: usize, part: &str| format!("{path}.experts.{x}.{part}");
        let stacked = |gate_up: &str, down: &str, router: &str| -> Result<(Linear, Vec<Expert>)> {
            let gu = sliced(gate_up, self.base.get(gate_up)?, (2 * inter, h))?;
            let dn = sliced(down, self.base.get(down)?, (h, inter))?;
            let experts = gu
                .into_iter()
                .zip(dn)
                .enumerate()
                .map(|(x, (gu, d))| {
                    Ok(Expert {
                        gate: dense(expert_name(x, "gate_proj"), gu.narrow(0, 0, inter)?)?,
                        up: dense(expert_name(x, "up_proj"), gu.narrow(0, inter, inter)?)?,
                        down: dense(expert_name(x, "down_proj"), d)?,
                        gate_up_lora: None,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok((self.linear(router, (e, h), false)?, experts))
        };
        let (router, experts) = if let ExpertStorage::Interleaved = layout.stored {
            let router = self.linear(&format!("{path}.{}", layout.router), (e, h), true)?;
            (router, self.interleaved_experts(&path, h, moe)?)
        } else if self.base.tensors.contains_key(&fused) {
            let router = format!("{path}.{}", layout.router);
            stacked(&fused, &format!("{path}.experts.down_proj"), &router)?
        } else {
            match &layout.stored {
                ExpertStorage::Stacked { router, gate_up, down } => stacked(
                    &format!("{path}.{gate_up}.weight"),
                    &format!("{path}.{down}.weight"),
                    &format!("{path}.{router}"),
                )?,
                ExpertStorage::Interleaved => unreachable!("read above"),
                ExpertStorage::PerExpert { block, router, gate, up, down } => {
                    let stem = format!("{p}.{block}");
                    let experts = (0..e)
                        .map(|x| {
                            let part = |name: &str, shape| {
                                self.linear(&format!("{stem}.experts.{x}.{name}"), shape, false)
                                    .with_context(|| format!("layer {i}: expert {x} of {e}"))
                            };
                            Ok(Expert {
                                gate: part(gate, (inter, h))?,
                                up: part(up, (inter, h))?,
                                down: part(down, (h, inter))?,
                                gate_up_lora: None,
                            })
                        })
                        .collect::<Result<Vec<_>>>()?;
                    (self.linear(&format!("{stem}.{router}"), (e, h), false)?, experts)
                }
            }
        };
        Ok(SparseMlp {
            path,
            family: self.family,
            router,
            experts,
            top_k: moe.top_k,
            renormalise: moe.renormalise,
            clamp: moe.clamp,
            trained_router: None,
        })
    }

    /// gpt-oss's experts under `path` (the block): transformers' transposed weights or the hub's
    /// MXFP4 blocks, gate and up interleaved, with their biases. Dense where the base is not loaded
    /// for QLoRA; for QLoRA the MXFP4 blocks are kept as they are (on the CPU) and dense experts go
    /// to NF4.
    fn interleaved_experts(&self, path: &str, h: usize, moe: &Moe) -> Result<Vec<Expert>> {
        let (e, inter) = (moe.experts, moe.intermediate);
        let bias = |name: &str, len: usize| -> Result<Tensor> {
            let full = format!("{path}.experts.{name}");
            let t = self.base.get(&full)?;
            self.check(&full, t.dims(), &[e, len])?;
            Ok(t.to_dtype(self.dtype)?.to_device(self.device)?)
        };
        let (gate_up_bias, down_bias) = (bias("gate_up_proj_bias", 2 * inter)?, bias("down_proj_bias", h)?);
        let (gate_up, down) = (
            self.expert_weights(path, "gate_up_proj", e, 2 * inter, h)?,
            self.expert_weights(path, "down_proj", e, h, inter)?,
        );
        (0..e)
            .map(|x| {
                let b = gate_up_bias.get(x)?.reshape((inter, 2))?;
                let half = |j: usize| -> Result<Tensor> { Ok(b.narrow(1, j, 1)?.squeeze(1)?.contiguous()?) };
                let name = |part: &str| format!("{path}.experts.{x}.{part}");
                Ok(Expert {
                    gate: self.held(name("gate_proj"), gate_up.rows(x, Some(0))?, half(0)?)?,
                    up: self.held(name("up_proj"), gate_up.rows(x, Some(1))?, half(1)?)?,
                    down: self.held(name("down_proj"), down.rows(x, None)?, down_bias.get(x)?)?,
                    gate_up_lora: None,
                })
            })
            .collect()
    }

    /// One stacked expert parameter of gpt-oss (`gate_up_proj` or `down_proj`) as [E, out, in]: from
    /// transformers' [E, in, out], or the hub's MXFP4 blocks ([E, out, in/32, 16] and scales).
    fn expert_weights(&self, path: &str, name: &str, e: usize, out: usize, inp: usize) -> Result<ExpertWeights> {
        let full = format!("{path}.experts.{name}");
        if let Some(t) = self.base.tensors.get(&full) {
            self.check(&full, t.dims(), &[e, inp, out])?;
            return Ok(ExpertWeights::Dense(t.transpose(1, 2)?));
        }
        let blocks = self
            .base
            .get(&format!("{full}_blocks"))
            .with_context(|| format!("gpt-oss keeps its experts as {full} (or MXFP4 {full}_blocks and _scales)"))?;
        let scales = self.base.get(&format!("{full}_scales"))?;
        self.check(&format!("{full}_blocks"), blocks.dims(), &[e, out, inp / mxfp4::BLOCK, 16])?;
        if self.base.qlora && self.device.is_cpu() {
            return Ok(ExpertWeights::Mxfp4(blocks.clone(), scales.clone()));
        }
        Ok(ExpertWeights::Dense(mxfp4::dequantize(blocks, scales).with_context(|| format!("{full}_blocks"))?))
    }

    /// A frozen expert projection with its bias: NF4 for QLoRA where it came dense, as given
    /// otherwise.
    fn held(&self, name: String, w: Held, bias: Tensor) -> Result<Linear> {
        let mut l = match w {
            Held::Mxfp4(q) => Linear::quantised(name, Weight::Mxfp4(Arc::new(q)), self.device),
            Held::Dense(w) if self.base.qlora => {
                let q = nf4_of(&w)?;
                Linear::quantised(name, Weight::Nf4 { gpu: self.nf4_on_device(&q)?, cpu: q }, self.device)
            }
            Held::Dense(w) => Linear::new(name, w.contiguous()?.to_dtype(self.dtype)?.to_device(self.device)?, None),
        };
        l.bias = Some(bias.contiguous()?);
        Ok(l)
    }
}
