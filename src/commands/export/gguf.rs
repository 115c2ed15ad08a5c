//! `tunekit export gguf --adapter RUN --model BASE --out FILE.gguf [--merge]`: a trained LoRA
//! adapter as llama.cpp's LoRA GGUF, checked against the base it will be loaded with; with
//! `--merge`, the GGUF base with the adapter folded in, its chat template the training shards'.
//! Without `--adapter`, `--model RUN` (a full fine-tune's model directory) as one model GGUF.

use crate::commands::Summary;
use crate::export::gguf::adapter::{self, AdapterExport, AdapterType};
use crate::export::gguf::merged::{self, MergedExport, ModelType};
use crate::pack::manifest::Manifest;
use anyhow::{bail, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct GgufOptions {
    /// The LoRA run; None exports `model` itself (a full fine-tune's run directory).
    pub adapter: Option<PathBuf>,
    pub model: PathBuf,
    pub out: PathBuf,
    pub ty: ModelType,
    pub merge: bool,
    /// The shards the adapter was trained on (default: the run's recorded --data).
    pub data: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Written {
    Adapter(AdapterExport),
    Merged(MergedExport),
}

#[derive(Debug, Serialize)]
pub struct GgufSummary {
    pub command: &'static str,
    pub out: String,
    #[serde(rename = "type")]
    pub ty: ModelType,
    #[serde(flatten)]
    pub written: Written,
    pub seconds: f64,
}

/// The shards a run trained on, from its last checkpoint's options.
fn recorded_data(run: &Path) -> Option<PathBuf> {
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("checkpoint-last/state.json")).ok()?).ok()?;
    state["options"]["data"].as_str().map(PathBuf::from)
}

/// The training shards (`data`, or the run's recorded --data) with their manifest and the chat
/// template they were rendered with, if they can be found.
pub fn training_shards(run: &Path, data: Option<&Path>) -> Result<Option<(PathBuf, Manifest, Option<String>)>> {
    let Some(dir) = data.map(Path::to_path_buf).or_else(|| recorded_data(run)) else { return Ok(None) };
    let m = match Manifest::read(&dir) {
        Ok(m) => m,
        Err(e) if data.is_some() => return Err(e),
        Err(_) => return Ok(None),
    };
    let tok = || crate::tokenize::TokenizerInfo::load(Path::new(&m.tokenizer.path)).ok().and_then(|t| t.chat_template);
    let template = m.template_source(tok);
    Ok(Some((dir, m, template)))
}

pub fn run(o: &GgufOptions) -> Result<GgufSummary> {
    let start = Instant::now();
    let Some(adapter) = o.adapter.as_deref() else {
        return whole_model(o, start);
    };
    let written = if o.merge {
        let shards = training_shards(adapter, o.data.as_deref())?;
        // A Hugging Face base without a tokenizer of its own: the one the shards were made with.
        let tokenizer = shards
            .as_ref()
            .filter(|_| o.model.is_dir() && !o.model.join("tokenizer.json").exists())
            .map(|(_, m, _)| PathBuf::from(&m.tokenizer.path));
        let template = shards.and_then(|(_, _, t)| t);
        if template.is_none() {
            crate::progress::warn(
                "the training shards' chat template was not found (pass --data SHARDS); the base's own template is kept",
            );
        }
        Written::Merged(merged::export(Some(adapter), &o.model, o.ty, template, tokenizer.as_deref(), &o.out)?)
    } else {
        let ty = match o.ty {
            ModelType::F32 => AdapterType::F32,
            ModelType::F16 => AdapterType::F16,
            ModelType::Q8_0 => AdapterType::Q8_0,
            other => {
                bail!("--type {other:?}: an adapter is written as f32, f16 or q8_0 (bf16 and q4_k_m are for --merge)")
            }
        };
        let base = crate::train::io::read_config(&o.model)?;
        Written::Adapter(adapter::export(adapter, &base, ty, &o.out)?)
    };
    Ok(summary(o, written, start))
}

/// A model directory with no adapter, a full fine-tune's run above all, as one model GGUF: its
/// tokenizer, and the chat template of the shards it trained on (the run's recorded --data, or
/// `--data`).
fn whole_model(o: &GgufOptions, start: Instant) -> Result<GgufSummary> {
    if !o.model.is_dir() {
        bail!(
            "export gguf without --adapter writes a Hugging Face model directory (a `train --full` run) as one GGUF; \
             {} is not a directory: give the LoRA run as --adapter",
            o.model.display()
        );
    }
    if merged::is_moe_dir(&o.model) {
        bail!(
            "{}: a mixture of experts is exported with its adapter (--adapter); a fully fine-tuned one not yet",
            o.model.display()
        );
    }
    let template = training_shards(&o.model, o.data.as_deref())?.and_then(|(_, _, t)| t);
    let written = Written::Merged(merged::export(None, &o.model, o.ty, template, None, &o.out)?);
    Ok(summary(o, written, start))
}

fn summary(o: &GgufOptions, written: Written, start: Instant) -> GgufSummary {
    GgufSummary {
        command: "export gguf",
        out: o.out.display().to_string(),
        ty: o.ty,
        written,
        seconds: start.elapsed().as_secs_f64(),
    }
}

impl Summary for GgufSummary {
    fn print_human(&self) {
        match &self.written {
            Written::Adapter(e) => {
                println!(
                    "wrote {} ({} tensors, {:.1} MB, {:?}{}) in {:.2}s",
                    self.out,
                    e.tensors,
                    e.bytes as f64 / 1e6,
                    self.ty,
                    if e.f16_fallbacks > 0 {
                        format!("; {} with rows under a q8_0 block in f16", e.f16_fallbacks)
                    } else {
                        String::new()
                    },
                    self.seconds
                );
                println!(
                    "  llama.cpp LoRA adapter for architecture {}: r {}, alpha {} (scale {:.4})",
                    e.architecture, e.r, e.alpha, e.scale
                );
                println!("  run it: llama-cli -m BASE.gguf --lora {}", self.out);
            }
            Written::Merged(e) => {
                println!(
                    "wrote {} ({} tensors, {} with the adapter merged, {:.1} MB) in {:.2}s",
                    self.out,
                    e.tensors,
                    e.merged_projections,
                    e.bytes as f64 / 1e6,
                    self.seconds
                );
                let types: Vec<String> = e.types.iter().map(|(t, n)| format!("{n} {t}")).collect();
                println!("  types: {}", types.join(", "));
                if e.fallbacks > 0 {
                    println!(
                        "  {} tensor(s) in a fall-back type: rows not a multiple of the type's block",
                        e.fallbacks
                    );
                }
                if e.requantized > 0 {
                    println!(
                        "  {} quantised base tensor(s) dequantised and requantised (rounding twice costs accuracy; \
                         an f16 or f32 base avoids it)",
                        e.requantized
                    );
                }
                println!(
                    "  chat template: {}",
                    if e.chat_template_from_shards { "the training shards'" } else { "the base's (shards not found)" }
                );
                println!("  run it: llama-cli -m {}", self.out);
            }
        }
    }
}
