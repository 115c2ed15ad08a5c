//! Training checkpoints: a directory with the adapter (PEFT format, plus what the recipe adds, such
//! as a reward head; a full fine-tune's whole model as a Hugging Face directory), AdamW's moments and `state.json` (the recipe's position in its data and RNG
//! streams, Adam's step, the options). Written under a temporary name and renamed, so a checkpoint
//! directory that exists is complete; [`resume`] from it continues bit for bit (refused across
//! world sizes), and [`save`] has every rank give its part of the recipe's state while rank 0 writes.

use super::recipe::Recipe;
use super::trainable::Trainable;
use crate::train::model::Model;
use crate::train::optim::AdamW;
use crate::train::options::TrainOptions;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde_json::{json, Value};
use std::path::Path;

/// Loads the checkpoint `dir` into the adapters, the optimizer and the recipe; returns its step.
pub fn resume<R: Recipe>(dir: &Path, t: &Trainable, optim: &mut AdamW, recipe: &mut R) -> Result<u64> {
    let world = crate::cluster::world();
    let state = read(dir, t, optim)?;
    let step = state["step"].as_u64().with_context(|| format!("{}: state.json has no step", dir.display()))?;
    let saved = state["world_size"].as_u64().unwrap_or(1) as usize;
    if saved != world.size {
        bail!(
            "{} was saved by a run of {saved} rank(s); this run has {}: resume with the same world size \
             (each step's micro-batches are split over the ranks)",
            dir.display(),
            world.size
        );
    }
    recipe.restore(&state)?;
    Ok(step)
}

/// Saves the run at `step` to `dir`. Every rank takes part (a recipe may gather each rank's part
/// of its state); rank 0 writes.
pub fn save<R: Recipe>(
    dir: &Path,
    opts: &TrainOptions,
    t: &Trainable,
    recipe: &R,
    optim: &AdamW,
    step: u64,
) -> Result<()> {
    let world = crate::cluster::world();
    let mut state = recipe.state();
    state.insert("step".into(), json!(step));
    if world.size > 1 {
        state.insert("world_size".into(), json!(world.size));
    }
    if !world.is_main() {
        return Ok(());
    }
    write(dir, &t.model, opts, optim, Value::Object(state), &|d| recipe.save_extra(&t.model, d))
}

/// Variables a recipe trains beside the adapter that PEFT's format has no place for (PPO's value
/// head), saved by the recipe into a checkpoint under this name.
pub const EXTRA_VARS: &str = "extra_vars.safetensors";

/// Writes a checkpoint directory atomically: the adapter (PEFT format; `extra` may add to it), the
/// optimizer moments, and `state.json` with the caller's state, Adam's step and the options.
fn write(
    dir: &Path,
    model: &Model,
    opts: &TrainOptions,
    opt: &AdamW,
    state: serde_json::Value,
    extra: &dyn Fn(&Path) -> Result<()>,
) -> Result<()> {
    let tmp = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    save_weights(opts, model, &tmp)?;
    extra(&tmp)?;
    candle_core::safetensors::save(&opt.state_tensors()?, tmp.join("optimizer.safetensors"))?;
    std::fs::write(
        tmp.join("state.json"),
        serde_json::to_string_pretty(&json!({"state": state, "adam_step": opt.step, "options": opts}))?,
    )?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&tmp, dir)?;
    Ok(())
}

/// What a run trains, saved to `dir`: the adapter in PEFT's format, or in full fine-tuning the
/// whole model as a Hugging Face directory with the tokenizer the data was prepared with.
pub fn save_weights(opts: &TrainOptions, model: &Model, dir: &Path) -> Result<()> {
    if !model.is_full() {
        return crate::train::io::peft::save(model, &opts.lora, &opts.model.display().to_string(), dir);
    }
    let prepared =
        crate::pack::manifest::Manifest::read(&opts.data).ok().map(|m| std::path::PathBuf::from(m.tokenizer.path));
    let tokenizer = match prepared.filter(|p| p.exists()) {
        Some(p) => p,
        None => opts.model.clone(),
    };
    crate::train::io::model_dir::write(model, &opts.model, &tokenizer, dir)
}

/// Restores the trainable variables (by PEFT name) and the optimizer from a checkpoint; returns the
/// caller's state. A full fine-tune's weights were loaded from the checkpoint as the model.
/// PiSSA/OLoRA adapters, saved converted, give back their trained part.
fn read(dir: &Path, t: &Trainable, opt: &mut AdamW) -> Result<serde_json::Value> {
    let st: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join("state.json")).with_context(|| format!("{}: not a checkpoint", dir.display()))?,
    )?;
    if !t.model.is_full() {
        let initials = t.model.lora_initials();
        let (_, mut tensors) = crate::train::io::peft::read(dir)?;
        let extra = dir.join(EXTRA_VARS);
        if extra.exists() {
            tensors.extend(candle_core::safetensors::load(&extra, &Device::Cpu)?);
        }
        for (n, v) in &t.vars_named {
            let saved = tensors.get(n).with_context(|| format!("{}: checkpoint lacks {n}", dir.display()))?;
            let saved = match initials.get(n) {
                Some(initial) => crate::train::io::peft::trained_part(n, saved, initial)?,
                None => saved.clone(),
            };
            v.set(&saved.to_device(v.device())?)?;
        }
    }
    let ot = candle_core::safetensors::load(dir.join("optimizer.safetensors"), &Device::Cpu)?;
    opt.load_state_tensors(&ot).with_context(|| dir.display().to_string())?;
    opt.step = st["adam_step"].as_u64().unwrap_or(0);
    Ok(st["state"].clone())
}
