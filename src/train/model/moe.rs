//! The sparse mixture-of-experts block ([`SparseMlp`]): a router scores every expert for each
//! token (softmax in f32), the top-k are kept (their weights renormalised where the family says),
//! and each expert runs only on the tokens routed to it: its rows gathered, its SwiGLU computed,
//! its outputs weighted and added back at their tokens. Each call leaves a [`Routing`] record (the
//! expert counts and the router's summed probabilities) for the auxiliary loss and the load metrics
//! ([`super::routing`]).
//!
//! LoRA on the experts is PEFT's `target_parameters` on transformers' 3-D `experts.gate_up_proj`
//! [E, 2I, H] and `experts.down_proj` [E, H, I]: one A [r, in] and B [out, r] per expert (the
//! gate and up halves share theirs, as the fused parameter does), with no dropout (PEFT refuses
//! dropout there). [`crate::train::io::peft`] stacks them as PEFT stores them.

use super::family::{Activation, ClampedSwiglu, ExpertStorage, Family, MoeLayout};
use super::linear::{Linear, Shared};
use super::mlp::gated;
use super::routing::Routing;
use crate::split::SplitMix64;
use crate::train::adapters::lora::{Lora, LoraSettings, PEFT_PREFIX};
use anyhow::{Context, Result};
use candle_core::{DType, Tensor, Var, D};

/// One expert's frozen projections: gate [I, H], up [I, H], down [H, I].
pub struct Expert {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    /// LoRA on the fused gate_up (A [r, H], B [2I, r]); down's adapter is `down.lora`.
    pub gate_up_lora: Option<Lora>,
}

pub struct SparseMlp {
    /// transformers' module path of the block (`model.layers.3.mlp`), where PEFT's names start.
    pub path: String,
    pub family: &'static Family,
    pub router: Linear,
    pub experts: Vec<Expert>,
    pub top_k: usize,
    pub renormalise: bool,
    /// gpt-oss's clamped SwiGLU in place of the family's activation.
    pub clamp: Option<ClampedSwiglu>,
    /// The router trained in full, when it is (`--train-router`).
    pub trained_router: Option<TrainedRouter>,
}

/// A router trained in full (PEFT's `modules_to_save`): its weight, starting from the frozen one,
/// used while enabled (off: the base model, as DPO's reference).
pub struct TrainedRouter {
    pub weight: Var,
    /// Its bias, where the router has one (gpt-oss).
    pub bias: Option<Var>,
    pub enabled: std::cell::Cell<bool>,
}

/// Whether the adapter variable `name` belongs to an expert: a batch that routes no token to that
/// expert leaves it out of the graph, and its gradient is then zero (as PEFT's stacked expert
/// adapters give), not missing.
pub fn is_expert_adapter(name: &str) -> bool {
    name.contains(".experts.")
}

/// The two expert parameters PEFT adapts, as `target_parameters` names them after the block.
pub const EXPERT_PARAMETERS: [&str; 2] = ["experts.gate_up_proj", "experts.down_proj"];

impl SparseMlp {
    /// x [T, H] -> [T, H], with the routing record of the call.
    pub fn forward(&self, x: &Tensor, act: Activation) -> candle_core::Result<(Tensor, Routing)> {
        let (t, e) = (x.dim(0)?, self.experts.len());
        let logits = match self.trained_router.as_ref().filter(|r| r.enabled.get()) {
            Some(r) => {
                let l = x.to_dtype(DType::F32)?.matmul(&r.weight.as_tensor().t()?)?;
                match &r.bias {
                    Some(b) => l.broadcast_add(b.as_tensor())?,
                    None => l,
                }
            }
            None => self.router.forward(x, None)?.to_dtype(DType::F32)?,
        };
        let max = logits.max_keepdim(D::Minus1)?.detach();
        let exp = logits.broadcast_sub(&max)?.exp()?;
        let probs = exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)?; // [T, E]
        let chosen = top_k(&probs.to_vec2::<f32>()?, self.top_k);
        let k = self.top_k;
        let idx = Tensor::from_vec(chosen.iter().map(|&c| c as u32).collect::<Vec<_>>(), (t, k), x.device())?;
        let mut w = probs.gather(&idx, 1)?; // [T, k]
        if self.renormalise {
            w = w.broadcast_div(&w.sum_keepdim(1)?)?;
        }
        // Group the (token, slot) pairs by expert.
        let mut tokens: Vec<Vec<u32>> = vec![vec![]; e];
        let mut slots: Vec<Vec<u32>> = vec![vec![]; e];
        for (pos, &ex) in chosen.iter().enumerate() {
            tokens[ex].push((pos / k) as u32);
            slots[ex].push(pos as u32);
        }
        let (mut outs, mut order, mut slot_order) = (vec![], vec![], vec![]);
        for (ex, expert) in self.experts.iter().enumerate() {
            if tokens[ex].is_empty() {
                continue;
            }
            let rows = Tensor::new(tokens[ex].as_slice(), x.device())?;
            outs.push(self.expert_forward(expert, &x.index_select(&rows, 0)?, act)?);
            order.extend_from_slice(&tokens[ex]);
            slot_order.extend_from_slice(&slots[ex]);
        }
        let y = Tensor::cat(&outs, 0)?; // [T * k, H]
        let weights = w.flatten_all()?.index_select(&Tensor::new(slot_order.as_slice(), x.device())?, 0)?;
        let y = y.broadcast_mul(&weights.to_dtype(y.dtype())?.unsqueeze(1)?)?;
        let out = x.zeros_like()?.index_add(&Tensor::new(order.as_slice(), x.device())?, &y, 0)?;
        let counts = tokens.iter().map(|v| v.len() as u32).collect();
        Ok((out, Routing { counts, tokens: t, prob_sum: probs.sum(0)? }))
    }

    /// One expert on its rows: `down(act(gate x, up x))`, with the adapters.
    fn expert_forward(&self, ex: &Expert, x: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
        let xs = Shared::new(x);
        let (mut g, mut u) = (ex.gate.forward_shared(&xs, None)?, ex.up.forward_shared(&xs, None)?);
        if let Some(l) = ex.gate_up_lora.as_ref().filter(|l| l.enabled.get()) {
            let half = g.dim(1)?;
            let x32 = x.to_dtype(DType::F32)?;
            let d =
                (x32.matmul(&l.a.as_tensor().t()?)?.matmul(&l.b.as_tensor().t()?)? * l.scale)?.to_dtype(g.dtype())?;
            let (dg, du) = match self.interleaved() {
                true => {
                    let d = d.reshape((d.dim(0)?, half, 2))?;
                    (d.narrow(2, 0, 1)?.squeeze(2)?, d.narrow(2, 1, 1)?.squeeze(2)?)
                }
                false => (d.narrow(1, 0, half)?, d.narrow(1, half, half)?),
            };
            g = (g + dg)?;
            u = (u + du)?;
        }
        let (g, u) = (g.contiguous()?, u.contiguous()?);
        let h = match self.clamp {
            Some(c) => clamped_swiglu(&g, &u, c)?,
            None => gated(act, &g, &u)?,
        };
        ex.down.forward(&h, None)
    }

    /// Whether the fused gate_up (and its adapter's rows) interleaves gate and up (gpt-oss).
    fn interleaved(&self) -> bool {
        matches!(self.family.moe, Some(MoeLayout { stored: ExpertStorage::Interleaved, .. }))
    }

    /// Adds fresh adapters to the experts' gate_up and down where `gate_up` and `down` say; gate_up's
    /// of twice the rank and alpha where the settings say (PEFT's `rank_pattern`).
    pub fn add_lora(&mut self, s: &LoraSettings, gate_up: bool, down: bool, rng: &mut SplitMix64) -> Result<()> {
        if s.use_dora {
            anyhow::bail!(
                "DoRA on a mixture's experts is not supported (PEFT's target_parameters have no DoRA): target the \
                 attention projections only (--target q_proj,k_proj,v_proj,o_proj) or leave out --dora"
            );
        }
        if s.init.mutates_base() {
            anyhow::bail!(
                "--lora-init {} on a mixture's experts is not supported (PEFT's target_parameters start from noise): \
                 target the attention projections only (--target q_proj,k_proj,v_proj,o_proj) or leave out --lora-init",
                s.init.peft_name()
            );
        }
        let s = LoraSettings { dropout: 0.0, ..s.clone() };
        let fused = match s.doubled_gate_up {
            true => LoraSettings { r: 2 * s.r, alpha: 2.0 * s.alpha, ..s.clone() },
            false => s.clone(),
        };
        for ex in &mut self.experts {
            if gate_up {
                let (i, h) = ex.gate.dims()?;
                ex.gate_up_lora = Some(Lora::new(2 * i, h, &fused, rng, &ex.gate.device)?);
            }
            if down {
                ex.down.add_lora(&s, rng)?;
            }
        }
        Ok(())
    }

    /// The adapters of each expert parameter: (`experts.gate_up_proj` or `experts.down_proj`, one
    /// adapter per expert), for the adapted ones.
    pub fn adapters(&self) -> Vec<(&'static str, Vec<&Lora>)> {
        let gate_up: Option<Vec<&Lora>> = self.experts.iter().map(|e| e.gate_up_lora.as_ref()).collect();
        let down: Option<Vec<&Lora>> = self.experts.iter().map(|e| e.down.lora.as_ref()).collect();
        [(EXPERT_PARAMETERS[0], gate_up), (EXPERT_PARAMETERS[1], down)]
            .into_iter()
            .filter_map(|(n, l)| Some((n, l?)))
            .collect()
    }

    /// Trains the router in full from here on (its weight a variable, starting from the frozen one).
    pub fn train_router(&mut self) -> Result<()> {
        let weight = Var::from_tensor(&self.router.dense_weight()?.to_dtype(DType::F32)?)?;
        let bias = self.router.bias.as_ref().map(|b| Var::from_tensor(&b.to_dtype(DType::F32)?)).transpose()?;
        self.trained_router = Some(TrainedRouter { weight, bias, enabled: std::cell::Cell::new(true) });
        Ok(())
    }

    /// The router weight's name in a PEFT adapter (`modules_to_save` stores it under transformers'
    /// module path: `base_model.model.model.layers.0.mlp.gate.weight`).
    pub fn router_key(&self) -> String {
        let router = self.family.moe.map_or("gate", |m| m.router);
        format!("{PEFT_PREFIX}{}.{router}.weight", self.path)
    }

    /// Every frozen projection of the block: the router and each expert's three.
    pub fn frozen(&self) -> Vec<&Linear> {
        std::iter::once(&self.router).chain(self.experts.iter().flat_map(|e| [&e.gate, &e.up, &e.down])).collect()
    }

    /// The block's tensors as its family's checkpoints store them, adapters merged:
    /// (Hugging Face name, tensor).
    pub fn stored_tensors(&self, layer: usize) -> Result<Vec<(String, Tensor)>> {
        let interleaved = self.interleaved();
        let merged: Vec<(Tensor, Tensor, Tensor)> =
            self.experts.iter().map(|e| e.merged(interleaved)).collect::<candle_core::Result<_>>()?;
        let moe = self.family.moe.context("a sparse block belongs to an MoE family")?;
        let dtype = self.router.dense_weight()?.dtype();
        let (router, router_bias) = match &self.trained_router {
            Some(r) => (
                r.weight.as_tensor().to_dtype(dtype)?,
                r.bias.as_ref().map(|b| b.as_tensor().to_dtype(dtype)).transpose()?,
            ),
            None => (self.router.dense_weight()?, self.router.bias.clone()),
        };
        let biases = match router_bias {
            Some(router) => Some(Biases {
                router,
                experts: self
                    .experts
                    .iter()
                    .map(|e| {
                        let b = |l: &Linear| l.bias.clone().context("gpt-oss's experts have biases");
                        Ok((b(&e.gate)?, b(&e.up)?, b(&e.down)?))
                    })
                    .collect::<Result<_>>()?,
            }),
            None => None,
        };
        stored_layout(moe, layer, router, merged, biases)
    }
}

/// The biases of a sparse block whose family has them (gpt-oss): the router's [E] and each
/// expert's (gate [I], up [I], down [H]).
pub struct Biases {
    pub router: Tensor,
    pub experts: Vec<(Tensor, Tensor, Tensor)>,
}

/// A sparse layer's router and experts' (gate, up, down) weights (and biases, where the family has
/// them) under the names and in the layout its family's checkpoints store them.
pub fn stored_layout(
    moe: &MoeLayout,
    layer: usize,
    router: Tensor,
    experts: Vec<(Tensor, Tensor, Tensor)>,
    biases: Option<Biases>,
) -> Result<Vec<(String, Tensor)>> {
    let p = format!("model.layers.{layer}");
    Ok(match &moe.stored {
        ExpertStorage::PerExpert { block, router: r, gate, up, down } => {
            let mut out = vec![(format!("{p}.{block}.{r}.weight"), router)];
            for (e, (g, u, d)) in experts.into_iter().enumerate() {
                let stem = format!("{p}.{block}.experts.{e}");
                out.extend([(format!("{stem}.{gate}.weight"), g), (format!("{stem}.{up}.weight"), u)]);
                out.push((format!("{stem}.{down}.weight"), d));
            }
            out
        }
        ExpertStorage::Stacked { router: r, gate_up, down } => {
            let gu: Vec<Tensor> =
                experts.iter().map(|(g, u, _)| Tensor::cat(&[g, u], 0)).collect::<candle_core::Result<_>>()?;
            let d: Vec<&Tensor> = experts.iter().map(|m| &m.2).collect();
            vec![
                (format!("{p}.{}.{r}.weight", moe.block), router),
                (format!("{p}.{}.{gate_up}.weight", moe.block), Tensor::stack(&gu, 0)?),
                (format!("{p}.{}.{down}.weight", moe.block), Tensor::stack(&d, 0)?),
            ]
        }
        ExpertStorage::Interleaved => {
            let b = biases.context("gpt-oss's router and experts have biases")?;
            let stem = format!("{p}.{}", moe.block);
            // Gate and up rows interleaved ([I, 2, H] -> [2I, H]), then transposed to [H, 2I].
            let interleave = |g: &Tensor, u: &Tensor| -> candle_core::Result<Tensor> {
                let rows = g.dim(0)?;
                let cols: Vec<usize> = g.dims()[1..].to_vec();
                let mut shape = vec![2 * rows];
                shape.extend(&cols);
                Tensor::stack(&[g, u], 1)?.reshape(shape)
            };
            let gu: Vec<Tensor> =
                experts.iter().map(|(g, u, _)| interleave(g, u)?.t()).collect::<candle_core::Result<_>>()?;
            let d: Vec<Tensor> = experts.iter().map(|(_, _, d)| d.t()).collect::<candle_core::Result<_>>()?;
            let gub: Vec<Tensor> =
                b.experts.iter().map(|(g, u, _)| interleave(g, u)).collect::<candle_core::Result<_>>()?;
            let db: Vec<&Tensor> = b.experts.iter().map(|e| &e.2).collect();
            vec![
                (format!("{stem}.{}.weight", moe.router), router),
                (format!("{stem}.{}.bias", moe.router), b.router),
                (format!("{stem}.experts.gate_up_proj"), Tensor::stack(&gu, 0)?.contiguous()?),
                (format!("{stem}.experts.gate_up_proj_bias"), Tensor::stack(&gub, 0)?),
                (format!("{stem}.experts.down_proj"), Tensor::stack(&d, 0)?.contiguous()?),
                (format!("{stem}.experts.down_proj_bias"), Tensor::stack(&db, 0)?),
            ]
        }
    })
}

impl Expert {
    /// (gate, up, down) with the adapters folded in (the fused adapter's rows interleaved where
    /// `interleaved`).
    pub fn merged(&self, interleaved: bool) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (mut g, mut u) = (self.gate.dense_weight()?, self.up.dense_weight()?);
        if let Some(l) = &self.gate_up_lora {
            let half = g.dim(0)?;
            let d = (l.b.as_tensor().matmul(l.a.as_tensor())? * l.scale)?.to_dtype(g.dtype())?;
            let (dg, du) = match interleaved {
                true => {
                    let d = d.reshape((half, 2, d.dim(1)?))?;
                    (d.narrow(1, 0, 1)?.squeeze(1)?, d.narrow(1, 1, 1)?.squeeze(1)?)
                }
                false => (d.narrow(0, 0, half)?, d.narrow(0, half, half)?),
            };
            g = (g + dg)?;
            u = (u + du)?;
        }
        Ok((g, u, self.down.merged_weight()?))
    }
}

/// gpt-oss's expert activation: `(clamp(up, ±limit) + 1) * g * sigmoid(alpha g)`, `g = min(gate,
/// limit)` (clamped values pass no gradient, as torch's clamp).
fn clamped_swiglu(gate: &Tensor, up: &Tensor, c: ClampedSwiglu) -> candle_core::Result<Tensor> {
    let g = gate.minimum(c.limit)?;
    let u = up.clamp(-c.limit, c.limit)?;
    let glu = (&g * candle_nn::ops::sigmoid(&(&g * c.alpha)?)?)?;
    (u + 1.0)?.mul(&glu)
}

/// The `k` largest entries of each row, best first (ties to the lower index), flattened [T * k].
fn top_k(probs: &[Vec<f32>], k: usize) -> Vec<usize> {
    let mut out = Vec::with_capacity(probs.len() * k);
    let mut order: Vec<usize> = vec![];
    for row in probs {
        order.clear();
        order.extend(0..row.len());
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        out.extend_from_slice(&order[..k]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::top_k;

    #[test]
    fn top_k_takes_the_largest_first_and_ties_to_the_lower_index() {
        let rows = vec![vec![0.1, 0.5, 0.2, 0.2], vec![0.25, 0.25, 0.25, 0.25]];
        assert_eq!(top_k(&rows, 2), vec![1, 2, 0, 1]);
    }
}
