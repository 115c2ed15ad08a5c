//! LoRA as PEFT defines it: `y = x W^T (+ b) + (dropout(x) A^T B^T) * s` with A [r, in] initialised
//! Kaiming-uniform (a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))), B [out, r] zeros, and
//! s = alpha / r (alpha / sqrt(r) with rsLoRA). Only A and B are variables. The adapted layer is one
//! graph node over (x, A, B) with a hand-written backward ([`lora_linear`]); the frozen base it
//! adapts is an op given to it ([`BaseOp`]).

use crate::split::SplitMix64;
use crate::train::adapters::lora_init::LoraInit;
use crate::train::cpu::few_rows;
use crate::train::cpu::gemm::AddProduct;
use crate::train::cpu::lora as lora_kernel;
use crate::train::graph::{attached_forward, recording, with_cpu_f32, BaseOp};
use anyhow::Result;
use candle_core::{CustomOp3, DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoraSettings {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub rslora: bool,
    /// Module names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; Phi-3's fused
    /// qkv_proj and gate_up_proj, which q/k/v and gate/up also select there; a mixture's
    /// `experts.gate_up_proj` and `experts.down_proj`, which PEFT calls target_parameters).
    pub targets: Vec<String>,
    /// The experts' fused gate_up has twice the rank and alpha (PEFT's `rank_pattern` when it
    /// converts gate_proj/up_proj targets of an MoE into its expert parameter).
    #[serde(default)]
    pub doubled_gate_up: bool,
    /// A mixture's routers trained in full beside the adapters (PEFT's `modules_to_save`).
    #[serde(default)]
    pub train_router: bool,
    /// DoRA (PEFT's `use_dora`): a trained magnitude per output row.
    #[serde(default)]
    pub use_dora: bool,
    /// How A and B start (PEFT's `init_lora_weights`): PiSSA and OLoRA from the base's factors,
    /// the base then the residual.
    #[serde(default)]
    pub init: LoraInit,
}

pub const ALL_LINEAR: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// The fused projections of families that fuse them (Phi-3), by the modules they hold.
pub const FUSED: [(&str, [&str; 3]); 2] =
    [("qkv_proj", ["q_proj", "k_proj", "v_proj"]), ("gate_up_proj", ["gate_proj", "up_proj", "up_proj"])];

/// Whether a target module name selects the projection named `module` (its last path part): the
/// same name, or a fused projection holding the target.
pub fn selects(target: &str, module: &str) -> bool {
    target == module || FUSED.iter().any(|(fused, parts)| module == *fused && parts.contains(&target))
}

/// Whether `targets` adapt a mixture's experts: (their gate_up, their down). The projection names
/// select them (`gate_proj`/`up_proj`/`gate_up_proj`, `down_proj`: all-linear adapts the experts
/// too), as do PEFT's parameter names (`mlp.experts.gate_up_proj`) and `experts` (both).
pub fn expert_targets(targets: &[String]) -> (bool, bool) {
    let has = |names: &[&str]| {
        targets.iter().any(|t| {
            let last = t.rsplit('.').next().unwrap_or(t);
            t == "experts" || names.contains(&last)
        })
    };
    (has(&["gate_proj", "up_proj", "gate_up_proj"]), has(&["down_proj"]))
}

/// Where PEFT keeps the model's own module paths in an adapter file's tensor names.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// PEFT's name of a LoRA matrix (`ab`: "A" or "B") of the module at `module` (a path such as
/// `model.layers.0.self_attn.q_proj`): `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
pub fn peft_key(module: &str, ab: &str) -> String {
    format!("{PEFT_PREFIX}{module}.lora_{ab}.weight")
}

/// PEFT's name of a DoRA magnitude vector of the module at `module`.
pub fn peft_magnitude_key(module: &str) -> String {
    format!("{PEFT_PREFIX}{module}.lora_magnitude_vector")
}

/// The module path of a PEFT LoRA A matrix's name (None for any other tensor).
pub fn module_of_lora_a(key: &str) -> Option<&str> {
    let stem = key.strip_suffix(".lora_A.weight")?;
    Some(stem.strip_prefix(PEFT_PREFIX).unwrap_or(stem))
}

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
            if !ALL_LINEAR.contains(&x.as_str()) && !FUSED.iter().any(|(f, _)| f == x) {
                anyhow::bail!(
                    "--target: unknown module '{x}' (use {}, qkv_proj, gate_up_proj or all-linear)",
                    ALL_LINEAR.join(",")
                );
            }
        }
        Ok(t)
    }
}

pub struct Lora {
    pub a: Var,
    pub b: Var,
    /// DoRA's magnitude per output row [out] (None: plain LoRA).
    pub magnitude: Option<Var>,
    pub scale: f64,
    pub dropout: f64,
    /// Off = the base model alone (DPO's reference model without a second copy in memory).
    pub enabled: std::cell::Cell<bool>,
    /// PiSSA/OLoRA: the initial (A, B), taken from the base, which holds the residual
    /// `W - s B A`: the layer off adds them back, and the saved adapter is converted against them.
    pub initial: Option<(Tensor, Tensor)>,
}

impl Lora {
    /// A fresh adapter for a layer of `inp` -> `out` features (PEFT's initialisation), drawn from `rng`.
    pub fn new(out: usize, inp: usize, s: &LoraSettings, rng: &mut SplitMix64, device: &Device) -> Result<Self> {
        let bound = 1.0 / (inp as f64).sqrt();
        let a: Vec<f32> = (0..s.r * inp).map(|_| (rng.uniform() * 2.0 - 1.0) as f32 * bound as f32).collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (s.r, inp), device)?)?;
        let b = Var::from_tensor(&Tensor::zeros((out, s.r), DType::F32, device)?)?;
        Ok(Lora {
            a,
            b,
            magnitude: None,
            scale: s.scale(),
            dropout: s.dropout,
            enabled: std::cell::Cell::new(true),
            initial: None,
        })
    }
}

/// Whether the low-rank term is added in place onto `t` (a fresh f32 CPU product of `rows` rows;
/// decoding's few rows keep their dot-product path).
fn in_place(t: &Tensor, rows: usize) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous() && rows > few_rows::MAX_ROWS
}

/// `du = s dy B` [T, r] and `db = s dy^T u` [out, r] by the one-pass CPU kernel (`cpu::lora`), where
/// it applies: f32 on the CPU, dy [T, out] with more than decoding's few rows, a rank it has.
fn output_grads(dy: &Tensor, b: &Tensor, u: &Tensor, scale: f64) -> candle_core::Result<Option<(Tensor, Tensor)>> {
    let (t, out) = dy.dims2()?;
    let r = b.dim(1)?;
    if !(dy.device().is_cpu() && dy.dtype() == DType::F32 && u.dtype() == DType::F32 && t > few_rows::MAX_ROWS) {
        return Ok(None);
    }
    let grads = with_cpu_f32(&[dy, b, u], |x| lora_kernel::output_grads(x[0], x[1], x[2], t, out, r, scale as f32))?;
    let dev = dy.device();
    grads.map(|(du, db)| Ok((Tensor::from_vec(du, (t, r), dev)?, Tensor::from_vec(db, (out, r), dev)?))).transpose()
}

/// `y = base(x) + s * (mask ⊙ x) A^T B^T` over (x, A, B); `u = (mask ⊙ x) A^T` [T, r] is kept.
struct LoraLinearFn {
    base: BaseOp,
    scale: f64,
    mask: Option<Tensor>,
    u: Tensor,
}

impl CustomOp3 for LoraLinearFn {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    attached_forward!(3);

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Inputs are graph nodes: detached, so that no gradient carries the forward graph along.
        let (x, a, b) = (&x.detach(), a.detach(), b.detach());
        let dx_base = self.base.bwd(x, y, dy)?.expect("a base op gives the input gradient");
        let dy32 = dy.to_dtype(DType::F32)?;
        let (du, db) = match output_grads(&dy32, &b, &self.u, self.scale)? {
            Some(grads) => grads,
            None => (
                dy32.matmul(&(&b * self.scale)?)?,          // [T, r]
                (dy32.t()?.matmul(&self.u)? * self.scale)?, // [out, r]
            ),
        };
        let mut xin = x.to_dtype(DType::F32)?;
        if let Some(m) = &self.mask {
            xin = (xin * m)?;
        }
        let da = du.t()?.matmul(&xin)?; // [r, in]
        if self.mask.is_none() && in_place(&dx_base, du.dim(0)?) {
            // dx_base is the base op's fresh gradient: `+= du A` there.
            dx_base.inplace_op3(&du, &a, &AddProduct { beta: 1.0, rhs_transposed: false })?;
            return Ok((Some(dx_base), Some(da), Some(db)));
        }
        let mut dx = du.matmul(&a)?; // [T, in]
        if let Some(m) = &self.mask {
            dx = (dx * m)?;
        }
        Ok((Some((dx_base + dx.to_dtype(x.dtype())?)?), Some(da), Some(db)))
    }
}

/// A LoRA linear layer as one graph node over (x, A, B). `x32` is x in f32 (shared by the
/// projections that read the same input), `mask` the inverted-dropout mask of the adapter's input.
pub fn lora_linear(
    x: &Tensor,
    x32: &Tensor,
    base: BaseOp,
    bias: Option<&Tensor>,
    (a_var, b_var, scale): (&Tensor, &Tensor, f64),
    mask: Option<Tensor>,
) -> candle_core::Result<Tensor> {
    let xd = x.detach().contiguous()?;
    let mut y = xd.apply_op1_arc(base.clone())?;
    if let Some(bias) = bias {
        y = y.broadcast_add(bias)?;
    }
    let xin = match &mask {
        Some(m) => (x32.detach() * m)?,
        None => x32.detach(),
    };
    let (a, b) = (a_var.detach(), b_var.detach());
    // A few rows (decoding): the adapter's two small products as dot products, no GEMM calls. Many
    // rows: `x A^T` as `(A x^T)^T`, the rank's few rows against the tokens.
    let u = match few_rows::linear(&xin, &a)? {
        Some(u) => u,
        None => match few_rows::low_rank(&xin, &a)? {
            Some(u) => u,
            None => xin.matmul(&a.t()?)?,
        },
    };
    let y = if in_place(&y, u.dim(0)?) {
        // y is this call's own buffer: `y += s u B^T` there, no [tokens, out] temporary.
        y.inplace_op3(&u, &b, &AddProduct { beta: scale as f32, rhs_transposed: true })?;
        y
    } else {
        let delta = match few_rows::linear(&u, &b)? {
            Some(d) => (d * scale)?,
            // The scale goes on B^T [r, out], not on the [tokens, out] product.
            None => u.matmul(&(b.t()? * scale)?)?,
        };
        (y + delta.to_dtype(x.dtype())?)?
    };
    if !recording() {
        return Ok(y);
    }
    Ok(y.with_backward3(x, a_var, b_var, LoraLinearFn { base, scale, mask, u }))
}

/// Inverted-dropout mask (0 or 1/(1-p)) shaped as `x`, in f32, drawn from `rng` (reproducible
/// across resumes).
pub fn dropout_mask(x: &Tensor, p: f64, rng: &mut SplitMix64) -> candle_core::Result<Tensor> {
    let keep = (1.0 / (1.0 - p)) as f32;
    let mask: Vec<f32> = (0..x.elem_count()).map(|_| if rng.uniform() >= p { keep } else { 0.0 }).collect();
    Tensor::from_vec(mask, x.shape(), x.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::graph::no_grad;
    use crate::train::graph::testing::{max_diff, rand, same_as_graph};
    use std::sync::Arc;

    #[test]
    fn lora_linear_with_dropout_and_bias_matches_the_graph() {
        let (w, bias) = (rand(&[3, 6], 1), rand(&[3], 2));
        let mask = (rand(&[5, 6], 3).ge(0.0).unwrap().to_dtype(DType::F32).unwrap() * 2.0).unwrap();
        let base: BaseOp = Arc::new(Box::new(crate::train::graph::FrozenMatmul { w: w.clone() }));
        same_as_graph(
            |t| lora_linear(&t[0], &t[0], base.clone(), Some(&bias), (&t[1], &t[2], 0.7), Some(mask.clone())).unwrap(),
            |t| {
                let y = t[0].matmul(&w.t().unwrap()).unwrap().broadcast_add(&bias).unwrap();
                let d =
                    (&t[0] * &mask).unwrap().matmul(&t[1].t().unwrap()).unwrap().matmul(&t[2].t().unwrap()).unwrap();
                (y + (d * 0.7).unwrap()).unwrap()
            },
            &[rand(&[5, 6], 4), rand(&[2, 6], 5), rand(&[3, 2], 6)],
        );
    }

    #[test]
    fn lora_linear_adding_in_place_matches_the_graph() {
        // More rows than decoding's few: the low-rank term is added onto the base product in place,
        // forward and backward.
        let w = rand(&[9, 6], 40);
        let base: BaseOp = Arc::new(Box::new(crate::train::graph::FrozenMatmul { w: w.clone() }));
        same_as_graph(
            |t| lora_linear(&t[0], &t[0], base.clone(), None, (&t[1], &t[2], 0.7), None).unwrap(),
            |t| {
                let y = t[0].matmul(&w.t().unwrap()).unwrap();
                let d = t[0].matmul(&t[1].t().unwrap()).unwrap().matmul(&t[2].t().unwrap()).unwrap();
                (y + (d * 0.7).unwrap()).unwrap()
            },
            &[rand(&[40, 6], 41), rand(&[2, 6], 42), rand(&[9, 2], 43)],
        );
    }

    #[test]
    fn rank_8_and_16_gradients_by_the_cpu_kernel_match_the_graph() {
        // Ranks the one-pass kernel takes, over 70 rows (a parallel chunk and a tail), with dropout.
        let w = rand(&[9, 6], 50);
        let base: BaseOp = Arc::new(Box::new(crate::train::graph::FrozenMatmul { w: w.clone() }));
        let mask = (rand(&[70, 6], 51).ge(0.0).unwrap().to_dtype(DType::F32).unwrap() * 2.0).unwrap();
        for (r, m) in [(8, None), (16, Some(mask))] {
            same_as_graph(
                |t| lora_linear(&t[0], &t[0], base.clone(), None, (&t[1], &t[2], 0.7), m.clone()).unwrap(),
                |t| {
                    let y = t[0].matmul(&w.t().unwrap()).unwrap();
                    let xin = match &m {
                        Some(m) => (&t[0] * m).unwrap(),
                        None => t[0].clone(),
                    };
                    let d = xin.matmul(&t[1].t().unwrap()).unwrap().matmul(&t[2].t().unwrap()).unwrap();
                    (y + (d * 0.7).unwrap()).unwrap()
                },
                &[rand(&[70, 6], 52), rand(&[r, 6], 53), rand(&[9, r], 54)],
            );
        }
    }

    #[test]
    fn no_grad_records_no_graph() {
        let (x, a, b) = (rand(&[5, 6], 30), Var::from_tensor(&rand(&[2, 6], 31)).unwrap(), rand(&[3, 2], 32));
        let base: BaseOp = Arc::new(Box::new(crate::train::graph::FrozenMatmul { w: rand(&[3, 6], 33) }));
        let run = || lora_linear(&x, &x, base.clone(), None, (a.as_tensor(), &b, 2.0), None).unwrap();
        let (recorded, plain) = (run(), no_grad(run));
        assert!(recorded.track_op() && !plain.track_op());
        assert_eq!(max_diff(&recorded, &plain), 0.0);
    }
}
