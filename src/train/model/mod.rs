//! A differentiable decoder-only causal LM of any family tunekit knows (Llama, Qwen2/3, Gemma 2/3,
//! Phi-3, SmolLM3, OLMo 2, Granite: [`family`], one file each), built for training on packed rows:
//! positions come from `position_ids`, attention is causal inside each segment only, and logits
//! are computed only where a label trains, in chunks. candle-transformers' models are
//! inference-only (last-token logits, fused ops without backward), so this is our own.
//!
//! One file per piece, each one graph node with a hand-written backward (see `train::graph`):
//! [`norm`] (RMSNorm), [`rope`] (rotary embeddings), [`attention`] over packed segments with its
//! [`softmax`], [`linear`] (the frozen base linear, dense or [`quant`]ised, with its adapter),
//! [`mlp`] (SwiGLU, GeGLU), [`head`] (the chunked loss head). [`layer`] holds a layer's weights,
//! [`decoder`] wires the pieces as the family says; [`checkpointing`] recomputes it layer by layer,
//! [`kv_cache`] runs it one token at a time. [`base`] is the frozen base as loaded, [`config`] its
//! shape, [`batch`] the input.

pub mod attention;
pub mod base;
pub mod batch;
pub mod checkpointing;
pub mod config;
pub mod decoder;
pub mod extend;
pub mod family;
pub mod full;
pub mod head;
pub mod head_weight;
pub mod kv_cache;
pub mod layer;
pub mod linear;
pub mod memory;
pub mod mlp;
pub mod moe;
pub mod mxfp4;
pub mod norm;
pub mod quant;
pub mod recomputed;
pub mod reward_head;
pub mod rope;
pub mod routing;
pub mod score;
use moe::SparseMlp;
pub mod softmax;

use crate::split::SplitMix64;
use crate::train::adapters::lora::{self, peft_key, LoraSettings};
use anyhow::{bail, Result};
use base::BaseModel;
use batch::Batch;
use candle_core::{DType, Device, Tensor, Var};
use config::ModelConfig;
use family::{Arch, Family};
pub use layer::Layer;
use linear::{Linear, Weight};
use quant::{Nf4Weight, QuantOnDevice};
use rope::RotaryTable;
use std::collections::HashMap;
use std::sync::Arc;

/// Rows of logits computed at a time by the loss head on the CPU ([rows, vocab] in f32, the
/// gradient written over them: 50 MB for a 49k vocabulary). Every chunk's two products pack the
/// whole head weight again: at 128 rows they ran at 200 GFLOP/s, at 256 at 240-255, near the
/// projections' speed (`cargo bench --bench kernels`, "Loss head by chunks of rows").
pub const LOGITS_CHUNK: usize = 256;

/// A GPU's chunks are this many times larger (fewer kernel launches; the memory is there).
const GPU_CHUNK_FACTOR: usize = 4;

pub struct Model {
    pub config: ModelConfig,
    /// The family, and how it puts this model's decoder together.
    pub family: &'static Family,
    pub arch: Arch,
    /// The token embedding [vocab, hidden]; empty when held in NF4 (`embed_q`).
    pub embed: Tensor,
    pub embed_q: Option<QuantEmbedding>,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    /// The output projection (the embedding again when tied), frozen, dense or NF4.
    pub lm_head: Linear,
    /// The tables of the model's rotary embeddings (Gemma 3: global and local).
    rotary: Vec<RotaryTable>,
    pub device: Device,
    /// Compute dtype of the frozen weights and activations (f32 on the CPU, bf16 on a GPU).
    pub dtype: DType,
    /// Reward-model head [1, hidden] on the last token (trained; PEFT `modules_to_save = ["score"]`).
    pub score: Option<Var>,
    /// The routing of each sparse layer in the latest forward (mixtures of experts), by layer.
    pub routing: std::cell::RefCell<Vec<(usize, routing::Routing)>>,
    /// Every weight as a variable with its Hugging Face name, in full fine-tuning ([`full`]);
    /// empty when the base is frozen.
    pub full: Vec<(String, Var)>,
}

/// An NF4 token embedding (QLoRA with `--qlora-embeddings`): rows are dequantised as looked up.
pub struct QuantEmbedding {
    pub cpu: Arc<Nf4Weight>,
    /// The same codes on the GPU, when training there.
    pub device: Option<QuantOnDevice>,
}

impl Model {
    /// The model in f32 on `device` (the CPU for generation, eval, merge and the tests).
    pub fn from_base(base: &BaseModel, device: &Device) -> Result<Model> {
        Self::from_base_as(base, device, DType::F32)
    }

    /// The model on `device` with its frozen weights and activations in `dtype` (bf16 on a GPU);
    /// adapters stay f32 whatever `dtype` is.
    pub fn from_base_as(base: &BaseModel, device: &Device, dtype: DType) -> Result<Model> {
        let c = base.config.clone();
        let family = family::of_model_type(&c.model_type)?;
        let arch = family::describe(&c)?;
        let load = layer::Loader { base, device, dtype, family };
        let layers = (0..c.num_hidden_layers).map(|i| load.layer(&c, &arch, i)).collect::<Result<Vec<_>>>()?;
        let embed_name = "model.embed_tokens.weight";
        let (embed, embed_q) = match base.nf4.get("model.embed_tokens") {
            Some(q) => (
                Tensor::zeros(0, dtype, device)?,
                Some(QuantEmbedding { cpu: q.clone(), device: load.nf4_on_device(q)? }),
            ),
            None => {
                let e = load.get(embed_name)?;
                if e.dims() != [c.vocab_size, c.hidden_size] {
                    bail!(
                        "{}: {embed_name} is {:?} but the config makes it [{}, {}]: the config and the weights disagree",
                        base.source.display(),
                        e.dims(),
                        c.vocab_size,
                        c.hidden_size
                    );
                }
                (e, None)
            }
        };
        let nf4_head = |cpu: &Arc<Nf4Weight>, gpu: Option<QuantOnDevice>| {
            Linear::quantised("lm_head".into(), Weight::Nf4 { cpu: cpu.clone(), gpu }, device)
        };
        let lm_head = match (c.tie_word_embeddings, base.nf4.get("lm_head"), &embed_q) {
            (false, Some(q), _) => nf4_head(q, load.nf4_on_device(q)?),
            (false, None, _) if base.tensors.contains_key("lm_head.weight") => {
                load.linear("lm_head", (c.vocab_size, c.hidden_size), false)?
            }
            (_, _, Some(e)) => nf4_head(&e.cpu, e.device.clone()),
            _ => Linear::new("lm_head".into(), embed.clone(), None),
        };
        let positions = c.max_position_embeddings.max(4096);
        let rotary = arch
            .rotaries
            .iter()
            .map(|r| RotaryTable::new(r, positions, dtype, device))
            .collect::<candle_core::Result<_>>()?;
        Ok(Model {
            rotary,
            dtype,
            norm: load.norm("model.norm", c.hidden_size)?,
            family,
            arch,
            config: c,
            embed,
            embed_q,
            layers,
            lm_head,
            device: device.clone(),
            score: None,
            routing: Default::default(),
            full: vec![],
        })
    }

    /// Adds LoRA adapters to the target modules of every layer. As PEFT matches target_modules: the
    /// module's name, or its full path or a suffix of it (PEFT saves "all-linear" resolved to full
    /// paths such as model.layers.0.mlp.up_proj); q/k/v and gate/up select Phi-3's fused projections.
    pub fn add_lora(&mut self, s: &LoraSettings, seed: u64) -> Result<()> {
        if s.use_dora && s.init.mutates_base() {
            bail!(
                "DoRA starts from the base's row norms; --lora-init {} is for plain LoRA: choose one",
                s.init.peft_name()
            );
        }
        let mut rng = SplitMix64::new(seed);
        let (mut any, mut routers) = (false, false);
        let expert_targets = lora::expert_targets(&s.targets);
        for layer in &mut self.layers {
            if let (layer::Mlp::Sparse(moe), (gate_up, down)) = (&mut layer.mlp, expert_targets) {
                if gate_up || down {
                    moe.add_lora(s, gate_up, down, &mut rng)?;
                    any = true;
                }
            }
            if let (layer::Mlp::Sparse(moe), true) = (&mut layer.mlp, s.train_router) {
                moe.train_router()?;
                routers = true;
            }
            for lin in layer.linears_mut() {
                let short = lin.name.rsplit('.').next().unwrap_or("").to_string();
                let hit = s.targets.iter().filter(|t| !t.contains("experts")).any(|t| {
                    let t_short = t.rsplit('.').next().unwrap_or(t);
                    lin.name.ends_with(&format!(".{t}"))
                        || lin.name == *t
                        || crate::train::adapters::lora::selects(t_short, &short)
                });
                if hit {
                    lin.add_lora(s, &mut rng)?;
                    any = true;
                }
            }
        }
        if !any {
            bail!("no projection of this {} model is among the LoRA targets {:?}", self.family.name, s.targets);
        }
        if s.init.mutates_base() {
            self.start_from_factors(s, seed)?;
        }
        if s.train_router && !routers {
            bail!("a trained router (--train-router, or modules_to_save) needs a mixture of experts; this {} model has none", self.family.name);
        }
        Ok(())
    }

    /// PiSSA/OLoRA: each adapted projection's adapter from its weight's factors, the weight left as
    /// the residual; one weight per thread (seconds on small models, minutes on large ones with the
    /// exact SVD: `pissa_niter_N` is the fast one). Each weight's random draws (the randomised
    /// SVD's) come from its own stream, so the result does not depend on the threads.
    fn start_from_factors(&mut self, s: &LoraSettings, seed: u64) -> Result<()> {
        use rayon::prelude::*;
        let started = std::time::Instant::now();
        let mut adapted: Vec<&mut Linear> =
            self.layers.iter_mut().flat_map(|l| l.linears_mut()).filter(|l| l.lora.is_some()).collect();
        let bar = crate::progress::bar(&format!("--lora-init {}", s.init.peft_name()), adapted.len() as u64);
        let within = faer::get_global_parallelism();
        faer::set_global_parallelism(faer::Par::Seq);
        let done = adapted.par_iter_mut().enumerate().try_for_each(|(i, lin)| {
            let mut rng = SplitMix64::new(seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            lin.start_from_factors(s, &mut rng)?;
            bar.inc(1);
            anyhow::Ok(())
        });
        faer::set_global_parallelism(within);
        bar.finish_and_clear();
        done?;
        crate::progress::note(&format!(
            "{} adapters started from their weights' {} factors in {:.1} s (the base holds the residual W - s B A)",
            adapted.len(),
            if s.init == crate::train::adapters::lora_init::LoraInit::Olora { "QR" } else { "singular" },
            started.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    /// The names of the adapted projections (`q_proj`, or Phi-3's `qkv_proj`), each once, in
    /// layer order: the adapter's `target_modules`; then the adapted expert parameters by their
    /// path in the layer (`mlp.experts.gate_up_proj`): its `target_parameters`.
    pub fn adapted_modules(&self) -> (Vec<String>, Vec<String>) {
        let (mut modules, mut params): (Vec<String>, Vec<String>) = (vec![], vec![]);
        for layer in &self.layers {
            for lin in layer.linears().into_iter().filter(|l| l.lora.is_some()) {
                let short = lin.name.rsplit('.').next().unwrap_or("").to_string();
                if !modules.contains(&short) {
                    modules.push(short);
                }
            }
            if let layer::Mlp::Sparse(moe) = &layer.mlp {
                for (param, _) in moe.adapters() {
                    let p = format!("{}.{param}", self.family.moe.map(|m| m.block).unwrap_or("mlp"));
                    if !params.contains(&p) {
                        params.push(p);
                    }
                }
            }
        }
        (modules, params)
    }

    /// Parameters of the base: every projection (experts and routers too), the embedding and an
    /// untied head (norms left out).
    pub fn num_params(&self) -> usize {
        let c = &self.config;
        let head = if c.tie_word_embeddings { 0 } else { c.vocab_size * c.hidden_size };
        self.projections_held().0 + c.vocab_size * c.hidden_size + head
    }

    /// Bytes per parameter of the frozen projections as held (4 for f32, ~0.52 NF4, 0.625 Q4_1).
    pub fn projection_bytes_per_param(&self) -> f64 {
        let (params, bytes) = self.projections_held();
        bytes as f64 / params.max(1) as f64
    }

    /// (parameters, bytes) of the projections of every layer as held (experts and routers included).
    fn projections_held(&self) -> (usize, usize) {
        self.layers.iter().flat_map(|l| l.frozen()).map(|l| l.held()).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    }

    /// Bytes per parameter of all the frozen weight matrices as held: projections, the embedding
    /// and an untied lm_head (norms are negligible and left out).
    pub fn base_bytes_per_param(&self) -> f64 {
        let (params, bytes) = self.frozen_matrices_held();
        bytes as f64 / params.max(1) as f64
    }

    /// QLoRA on the CPU: the embedding, and an lm_head held dense (tied or not), in bf16, as PEFT +
    /// bitsandbytes hold the modules they leave unquantised in a bf16 model. Rows are widened to the
    /// compute dtype as they are looked up, the head's a block of rows at a time; on SmolLM2 this
    /// halves the 113 MB the tied embedding took in f32.
    pub fn hold_embeddings_in_bf16(&mut self) -> candle_core::Result<()> {
        if self.embed_q.is_some() || !self.device.is_cpu() || self.dtype != DType::F32 {
            return Ok(());
        }
        let tied = matches!(&self.lm_head.weight, Weight::Dense(w) if w.id() == self.embed.id());
        self.embed = self.embed.to_dtype(DType::BF16)?;
        if let Weight::Dense(w) = &self.lm_head.weight {
            let held = if tied { self.embed.clone() } else { w.to_dtype(DType::BF16)? };
            self.lm_head.weight = Weight::Dense(held);
        }
        Ok(())
    }

    /// (parameters, bytes) of all the frozen weight matrices as held (see
    /// [`Model::base_bytes_per_param`]).
    pub fn frozen_matrices_held(&self) -> (usize, usize) {
        let (mut params, mut bytes) = self.projections_held();
        params += self.config.vocab_size * self.config.hidden_size;
        bytes += match &self.embed_q {
            Some(e) => e.cpu.bytes(),
            None => self.embed.elem_count() * self.embed.dtype().size_in_bytes(),
        };
        if !self.config.tie_word_embeddings {
            let (p, b) = self.lm_head.held();
            params += p;
            bytes += b;
        }
        (params, bytes)
    }

    /// Switches every adapter on or off (off: the reference model of DPO).
    pub fn set_lora_enabled(&self, on: bool) {
        for l in self.layers.iter().flat_map(|l| l.loras()) {
            l.enabled.set(on);
        }
        for layer in &self.layers {
            if let layer::Mlp::Sparse(SparseMlp { trained_router: Some(r), .. }) = &layer.mlp {
                r.enabled.set(on);
            }
        }
    }

    /// Sum of the log-probabilities of the trained tokens of one sequence (labels aligned with ids,
    /// -100 where not trained): log p(answer | prompt).
    pub fn sequence_logp(
        &self,
        ids: &[i32],
        labels: &[i32],
        rng: Option<&mut SplitMix64>,
    ) -> candle_core::Result<Tensor> {
        self.loss_sum(&self.one_sequence(ids, labels)?, rng, LOGITS_CHUNK)?.neg()
    }

    /// The log-probability of each trained token of one sequence, in order [trained], differentiable.
    pub fn sequence_token_log_probs(&self, ids: &[i32], labels: &[i32]) -> candle_core::Result<Tensor> {
        Ok(self.token_log_probs(&self.one_sequence(ids, labels)?, 1.0, false)?.0)
    }

    /// One sequence as a batch (labels aligned with ids, -100 where not trained).
    fn one_sequence(&self, ids: &[i32], labels: &[i32]) -> candle_core::Result<Batch> {
        let row = crate::pack::rows::PackedRow {
            input_ids: ids.to_vec(),
            labels: labels.to_vec(),
            position_ids: (0..ids.len() as i32).collect(),
            seq_lengths: vec![ids.len() as i32],
        };
        Batch::from_rows(&[&row], &self.device).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    /// Trainable variables with their PEFT names, in a fixed order (an expert's adapter as
    /// `…mlp.experts.{e}.gate_up_proj.lora_A.weight`: [`crate::train::io::peft`] stacks the experts'
    /// as PEFT stores them), in the order of [`Layer::loras`].
    pub fn lora_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for layer in &self.layers {
            for lin in layer.linears() {
                if let Some(l) = &lin.lora {
                    out.push((peft_key(&lin.name, "A"), l.a.clone()));
                    out.push((peft_key(&lin.name, "B"), l.b.clone()));
                    if let Some(m) = &l.magnitude {
                        out.push((lora::peft_magnitude_key(&lin.name), m.clone()));
                    }
                }
            }
            if let layer::Mlp::Sparse(moe) = &layer.mlp {
                for (param, per_expert) in moe.adapters() {
                    let name = param.trim_start_matches("experts.");
                    for (e, l) in per_expert.iter().enumerate() {
                        let module = format!("{}.experts.{e}.{name}", moe.path);
                        out.push((peft_key(&module, "A"), l.a.clone()));
                        out.push((peft_key(&module, "B"), l.b.clone()));
                    }
                }
                if let Some(r) = &moe.trained_router {
                    out.push((moe.router_key(), r.weight.clone()));
                    if let Some(b) = &r.bias {
                        out.push((moe.router_key().replace(".weight", ".bias"), b.clone()));
                    }
                }
            }
        }
        out
    }

    /// PiSSA/OLoRA's initial A and B by their PEFT names (empty for adapters that start from noise).
    pub fn lora_initials(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for lin in self.layers.iter().flat_map(|l| l.linears()) {
            if let Some((a, b)) = lin.lora.as_ref().and_then(|l| l.initial.as_ref()) {
                out.insert(peft_key(&lin.name, "A"), a.clone());
                out.insert(peft_key(&lin.name, "B"), b.clone());
            }
        }
        out
    }

    /// The routing records of the latest forward, taken (empty for a dense model).
    pub fn take_routing(&self) -> Vec<(usize, routing::Routing)> {
        std::mem::take(&mut *self.routing.borrow_mut())
    }

    /// Full logits [T, vocab] (for parity checks and generation).
    pub fn logits(&self, ids: &Tensor, positions: &Tensor, seq_lengths: &[usize]) -> candle_core::Result<Tensor> {
        let h = self.hidden(ids, positions, seq_lengths, None)?;
        self.logits_of(&h)
    }

    /// Sum of token cross-entropies over the trained positions of the batch (divide by the number
    /// of trained tokens of the whole accumulated batch outside). Logits only where labels train,
    /// `chunk` rows at a time.
    pub fn loss_sum(&self, batch: &Batch, rng: Option<&mut SplitMix64>, chunk: usize) -> candle_core::Result<Tensor> {
        let h = self.hidden(&batch.input_ids, &batch.position_ids, &batch.seq_lengths, rng)?;
        self.head_loss(&h, batch, chunk)
    }

    /// Per-token log-probabilities at `temperature` of the batch's trained tokens (the completion
    /// tokens of RL rollouts), differentiable in the adapters, and their entropies when asked.
    pub fn token_log_probs(
        &self,
        batch: &Batch,
        temperature: f64,
        entropy: bool,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let h = self.hidden(&batch.input_ids, &batch.position_ids, &batch.seq_lengths, None)?;
        self.log_probs_at(&h, batch, temperature, entropy)
    }

    /// `token_log_probs` from final hidden states already computed.
    pub fn log_probs_at(
        &self,
        h: &Tensor,
        batch: &Batch,
        temperature: f64,
        entropy: bool,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let sel = self.head_input(&h.index_select(&batch.loss_positions, 0)?)?;
        let chunk = if self.device.is_cpu() { LOGITS_CHUNK } else { LOGITS_CHUNK * GPU_CHUNK_FACTOR };
        let cap = self.arch.final_softcap;
        head::linear_log_probs(&sel, &self.lm_head, &batch.loss_targets, temperature, chunk, entropy, cap)
    }

    /// Cross-entropy summed over the trained positions, from the final hidden states (logits only
    /// there, `chunk` rows at a time, none kept: [`head::linear_cross_entropy`]).
    fn head_loss(&self, h: &Tensor, batch: &Batch, chunk: usize) -> candle_core::Result<Tensor> {
        if batch.trained == 0 {
            return Tensor::zeros((), DType::F32, &self.device);
        }
        let sel = self.head_input(&h.index_select(&batch.loss_positions, 0)?)?;
        let chunk = if self.device.is_cpu() { chunk } else { chunk * GPU_CHUNK_FACTOR };
        head::linear_cross_entropy(&sel, &self.lm_head, &batch.loss_targets, chunk, self.arch.final_softcap)
    }
}
