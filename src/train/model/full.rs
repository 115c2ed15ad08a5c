//! Full fine-tuning: every weight of the model made a variable in place ([`Model::train_in_full`]),
//! named as Hugging Face stores it. The pieces then give these weights their gradients as well as
//! their inputs': a projection through `graph::trained_matmul`, a norm through its fused backward
//! with the weight's term, the loss head through its chunked weight gradient, the embedding through
//! candle's `index_select`. A tied head is the embedding's variable itself, so its two gradients add
//! up in one tensor and it is updated once.

use super::layer::Mlp;
use super::linear::{Linear, Weight};
use super::Model;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var};

impl Model {
    /// Makes every weight trainable (f32 master weights: the model must compute in f32) and
    /// returns them with their Hugging Face names, in the order [`Model::trained_vars`] keeps.
    /// Refused for weights held quantised (QLoRA) and for what has no gradient yet.
    pub fn train_in_full(&mut self) -> Result<()> {
        if self.dtype != DType::F32 {
            bail!(
                "full fine-tuning keeps f32 master weights and computes in f32; this model was loaded in {:?} \
                 (use --dtype f32)",
                self.dtype
            );
        }
        if self.embed_q.is_some() {
            bail!("full fine-tuning trains the embedding: it cannot be held in NF4 (drop --qlora-embeddings)");
        }
        if self.layers.iter().any(|l| l.sinks.is_some()) {
            bail!(
                "full fine-tuning of {}: its attention sinks have no gradient yet; train LoRA adapters instead",
                self.family.name
            );
        }
        let mut vars: Vec<(String, Var)> = vec![];
        let mut var = |name: String, t: &mut Tensor| -> Result<()> {
            let v = Var::from_tensor(&t.to_dtype(DType::F32)?)?;
            *t = v.as_tensor().clone();
            vars.push((name, v));
            Ok(())
        };
        var("model.embed_tokens.weight".into(), &mut self.embed)?;
        let norm_names = self.family.norms;
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            for (name, w) in norm_names.iter().zip(layer.norms.iter_mut()) {
                if let (Some(name), Some(w)) = (name, w) {
                    var(format!("{p}.{name}.weight"), w)?;
                }
            }
            if let Some(q) = layer.q_norm.as_mut() {
                var(format!("{p}.self_attn.q_norm.weight"), q)?;
            }
            if let Some(k) = layer.k_norm.as_mut() {
                var(format!("{p}.self_attn.k_norm.weight"), k)?;
            }
            let mut linears: Vec<&mut Linear> = layer.qkv.iter_mut().chain([&mut layer.o]).collect();
            match &mut layer.mlp {
                Mlp::Dense { gate_up, down } => linears.extend(gate_up.iter_mut().chain([down])),
                Mlp::Sparse(moe) => {
                    linears.push(&mut moe.router);
                    for e in &mut moe.experts {
                        linears.extend([&mut e.gate, &mut e.up, &mut e.down]);
                    }
                }
            }
            for lin in linears {
                let name = lin.name.clone();
                let Weight::Dense(w) = &mut lin.weight else {
                    bail!("full fine-tuning: {name} is held quantised; load the base in full precision (drop --qlora)");
                };
                var(format!("{name}.weight"), w)?;
                if let Some(b) = lin.bias.as_mut() {
                    var(format!("{name}.bias"), b)?;
                }
            }
        }
        var("model.norm.weight".into(), &mut self.norm)?;
        if self.config.tie_word_embeddings {
            self.lm_head.weight = Weight::Dense(self.embed.clone());
        } else {
            let Weight::Dense(w) = &mut self.lm_head.weight else {
                bail!("full fine-tuning: lm_head is held quantised; load the base in full precision");
            };
            var("lm_head.weight".into(), w)?;
        }
        self.full = vars;
        Ok(())
    }

    /// Whether every weight is trained ([`Model::train_in_full`]).
    pub fn is_full(&self) -> bool {
        !self.full.is_empty()
    }

    /// The variables a run trains, with their names: every weight (Hugging Face names) in full
    /// fine-tuning, else the adapters (PEFT names, [`Model::lora_vars`]).
    pub fn trained_vars(&self) -> Vec<(String, Var)> {
        match self.is_full() {
            true => self.full.clone(),
            false => self.lora_vars(),
        }
    }
}
