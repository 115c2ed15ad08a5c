//! The model ready to train: the base loaded (quantised for QLoRA) where the options place it,
//! checked against the data's manifest, with its adapters added (or, in full fine-tuning, every
//! weight made trainable) and the trained variables in a fixed order under their names.

use crate::train::io::{load_model, Placement};
use crate::train::model::Model;
use crate::train::options::TrainOptions;
use anyhow::{bail, Result};
use candle_core::Var;
use std::path::Path;

/// The model ready to train: base loaded (quantised for QLoRA), adapters added, the variables in
/// a fixed order with their PEFT names.
pub struct Trainable {
    pub model: Model,
    pub vars_named: Vec<(String, Var)>,
    pub vars: Vec<Var>,
    pub base_params: usize,
    pub base_bytes_per_param: f64,
    pub projection_bytes_per_param: f64,
}

impl Trainable {
    /// Adds a variable trained beside the adapters (a reward model's head).
    pub fn add_var(&mut self, name: &str, var: Var) {
        self.vars_named.push((name.to_string(), var.clone()));
        self.vars.push(var);
    }

    /// Stops training the variable named `name` (if it is trained).
    pub fn drop_var(&mut self, name: &str) {
        if let Some(i) = self.vars_named.iter().position(|(n, _)| n == name) {
            self.vars_named.remove(i);
            self.vars.remove(i);
        }
    }

    pub fn trainable_params(&self) -> usize {
        self.vars.iter().map(|v| v.elem_count()).sum()
    }
}

/// Where and how `opts` holds the base.
pub fn placement(opts: &TrainOptions) -> Placement {
    Placement { device: opts.device, dtype: opts.dtype, qlora: opts.qlora, qlora_embeddings: opts.qlora_embeddings }
}

/// The model ready to train on the device and dtype of `opts`, checked against the data's manifest:
/// adapters added, or every weight a variable (`--full`; resumed from the checkpoint's weights).
pub fn load_trainable(opts: &TrainOptions, resume: Option<&Path>) -> Result<Trainable> {
    let weights = match (opts.full, resume) {
        (true, Some(dir)) => dir,
        _ => opts.model.as_path(),
    };
    let mut model = load_model(weights, None, &placement(opts))?;
    crate::train::data::check_manifest(&opts.data, model.config.vocab_size)?;
    let base_bytes_per_param = model.base_bytes_per_param();
    let projection_bytes_per_param = model.projection_bytes_per_param();
    if let Some(c) = opts.router_aux_loss_coef {
        match model.arch.moe.as_mut() {
            Some(moe) if c >= 0.0 && c.is_finite() => moe.aux_coef = c,
            Some(_) => bail!("--router-aux-loss-coef must be a finite number >= 0, not {c}"),
            None => bail!(
                "--router-aux-loss-coef: {} is not a mixture of experts (its {} layers are dense)",
                opts.model.display(),
                model.config.model_type
            ),
        }
    }
    match opts.full {
        true => model.train_in_full()?,
        false => model.add_lora(&opts.lora, opts.seed)?,
    }
    let vars_named = model.trained_vars();
    if vars_named.is_empty() {
        bail!("no LoRA module matched --target {:?}", opts.lora.targets);
    }
    let vars: Vec<Var> = vars_named.iter().map(|(_, v)| v.clone()).collect();
    // In full fine-tuning the trained weights are the base's: not counted twice.
    let base_params = if opts.full { 0 } else { model.num_params() };
    Ok(Trainable { model, vars_named, vars, base_params, base_bytes_per_param, projection_bytes_per_param })
}
