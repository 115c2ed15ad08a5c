//! `tunekit doctor SHARDS [--model M]`: the pre-flight check of a shard directory (the
//! [`crate::doctor`] checks), and with the model, its tokenizer and template compared and the memory
//! the largest micro-batch of the first epoch will take with the given batch settings. Exit 1 on
//! errors, 0 with warnings only.

use super::Summary;
use crate::doctor::{model, scan, Finding, Findings, Scanned, Severity, TokenFacts};
use crate::pack::manifest::Manifest;
use crate::tokenize::{LossMode, TokenizerInfo};
use crate::train::device::Precision;
use crate::train::io::Qlora;
use crate::train::model::memory::{estimate, MemoryEstimate, MicroBatch, StepSettings};
use anyhow::{bail, Result};
use serde::Serialize;
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct DoctorOptions {
    pub dir: PathBuf,
    pub model: Option<PathBuf>,
    /// The tokenizer the shards were prepared with (default: the manifest's).
    pub tokenizer: Option<PathBuf>,
    /// The training settings the memory estimate assumes (train's flags of the same names).
    pub batch_tokens: usize,
    pub seed: u64,
    pub lora_r: usize,
    pub gradient_checkpointing: bool,
    /// The precision train would compute in (auto counts as f32: the CPU's).
    pub dtype: Precision,
    /// The frozen projections in 4 bits, as `train --qlora` holds them.
    pub qlora: Option<Qlora>,
    /// Full fine-tuning (`train --full`) with this optimizer: every weight, its gradient and moments.
    pub full: Option<crate::train::optim::Optim>,
}

#[derive(Debug, Serialize)]
pub struct DoctorReport {
    pub command: &'static str,
    pub dir: String,
    pub format: String,
    /// The `train --method`s these shards serve.
    pub methods: Vec<&'static str>,
    pub tokenizer: String,
    pub model: Option<String>,
    #[serde(flatten)]
    pub scanned: Scanned,
    pub errors: u64,
    pub warnings: u64,
    pub findings: Vec<Finding>,
    pub memory: Option<MemoryReport>,
    /// What could not be checked, and why.
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct MemoryReport {
    /// Full fine-tuning's plan, not an adapter's.
    pub full: bool,
    pub batch_tokens: usize,
    pub gradient_checkpointing: bool,
    pub dtype: String,
    pub largest_micro_batch: MicroBatch,
    pub estimate: MemoryEstimate,
}

pub fn run(o: &DoctorOptions) -> Result<DoctorReport> {
    if o.full.is_some() && o.qlora.is_some() {
        bail!("--full plans every weight trained in f32; --qlora freezes the base in 4 bits for adapters: choose one");
    }
    let manifest = Manifest::read(&o.dir)?;
    let mut notes = vec![];
    let model_tok = o.model.as_deref().and_then(|m| match TokenizerInfo::load(m) {
        Ok(t) => Some(t),
        Err(e) => {
            notes.push(format!("the model's tokenizer and template were not compared: {e:#}"));
            None
        }
    });
    let config = o.model.as_deref().map(crate::train::io::read_config).transpose()?;
    let tok_path = o.tokenizer.clone().unwrap_or_else(|| PathBuf::from(&manifest.tokenizer.path));
    let shards_tok = TokenizerInfo::load(&tok_path).ok();
    let Some(tok) = shards_tok.as_ref().or(model_tok.as_ref()) else {
        bail!(
            "{}: the shards' tokenizer {} cannot be read; pass it as --tokenizer (or the model as --model)",
            o.dir.display(),
            tok_path.display()
        );
    };
    let vocab = config.as_ref().map_or(manifest.tokenizer.vocab_size.max(tok.vocab_size), |c| c.vocab_size);
    let template = manifest.template_source(|| tok.chat_template.clone());
    let mut facts = TokenFacts::new(tok, &tok.stop_ids(), template.as_deref(), vocab);
    facts.trains_prompts = manifest.loss == LossMode::All;
    let mut findings = Findings::default();
    let scanned = scan(&o.dir, &manifest, &facts, &mut findings)?;
    if let Some(mt) = &model_tok {
        model::compare(&manifest, shards_tok.as_ref(), mt, &mut findings);
    }
    let memory = config.as_ref().filter(|_| !scanned.train_rows.is_empty()).map(|c| memory(o, c, &scanned));
    let findings = findings.into_sorted();
    let count = |s: Severity| findings.iter().filter(|f| f.severity == s).map(|f| f.count).sum();
    Ok(DoctorReport {
        command: "doctor",
        dir: o.dir.display().to_string(),
        format: manifest.format.name().to_string(),
        methods: manifest.format.methods().to_vec(),
        tokenizer: tok.path.display().to_string(),
        model: o.model.as_ref().map(|m| m.display().to_string()),
        errors: count(Severity::Error),
        warnings: count(Severity::Warning),
        scanned,
        findings,
        memory,
        notes,
    })
}

/// The first epoch's micro-batches as train groups them; the estimate of the largest.
fn memory(o: &DoctorOptions, c: &crate::train::model::config::ModelConfig, s: &Scanned) -> MemoryReport {
    let rows = &s.train_rows;
    let order = crate::train::data::epoch_order(rows.len(), o.seed, 0);
    let batches = crate::train::data::micro_batches(&order, o.batch_tokens, |i| rows[i].iter().sum());
    let bf16 = o.dtype == Precision::Bf16;
    let settings = StepSettings {
        weight_bytes: if o.qlora.is_some() {
            0.5625
        } else if bf16 {
            2.0
        } else {
            4.0
        },
        activation_bytes: if bf16 { 2 } else { 4 },
        lora_r: o.lora_r,
        targets: 7,
        gradient_checkpointing: o.gradient_checkpointing,
        logits_chunk: crate::train::model::LOGITS_CHUNK,
        full_state_bytes: o.full.map(|optim| optim.state_bytes_per_param()),
        cpu_kernels: !bf16 && crate::train::model::memory::cpu_kernels_on(Default::default()),
    };
    let shape = |b: &Vec<usize>| MicroBatch::of(b.len(), || b.iter().flat_map(|&i| rows[i].iter().copied()));
    let largest = batches
        .iter()
        .map(shape)
        .max_by(|a, b| estimate(c, a, &settings).total_mb.total_cmp(&estimate(c, b, &settings).total_mb))
        .expect("train rows exist");
    MemoryReport {
        full: o.full.is_some(),
        batch_tokens: o.batch_tokens,
        gradient_checkpointing: o.gradient_checkpointing,
        dtype: if bf16 { "bf16" } else { "f32" }.into(),
        estimate: estimate(c, &largest, &settings),
        largest_micro_batch: largest,
    }
}

impl DoctorReport {
    /// Errors make the command fail (exit 1) after the report is printed.
    pub fn verdict(&self) -> Result<()> {
        if self.errors > 0 {
            bail!("doctor found {} error(s) in {}; fix them before training", self.errors, self.dir);
        }
        Ok(())
    }
}

impl Summary for DoctorReport {
    fn print_human(&self) {
        let s = &self.scanned;
        println!(
            "doctor {}: {} rows, {} sequences, {} tokens ({} trained), tokenizer {}",
            self.dir, s.rows, s.sequences, s.tokens, s.trained_tokens, self.tokenizer
        );
        if !self.methods.is_empty() {
            println!("  {} train with --method {}", self.format, self.methods.join(" | "));
        }
        if self.findings.is_empty() {
            println!("  no problems found");
        }
        for f in &self.findings {
            let sev = match f.severity {
                Severity::Error => "error",
                Severity::Warning => "warning",
            };
            println!("  {sev}: {} ({}x): {}", f.check, f.count, f.what);
            for e in &f.examples {
                println!("    {e}");
            }
            println!("    fix: {}", f.fix);
        }
        if let Some(m) = &self.memory {
            let e = &m.estimate;
            let b = &m.largest_micro_batch;
            let parts = match m.full {
                true => format!(
                    "{:.0} weights, {:.0} gradients, {:.0} optimizer states",
                    e.weights_mb, e.gradients_mb, e.optimizer_mb
                ),
                false => format!("{:.0} weights, {:.0} adapters + optimizer", e.weights_mb, e.adapters_mb),
            };
            println!(
                "  memory{}: the largest micro-batch ({} rows, {} tokens, longest segment {}) needs about {:.0} MB \
                 ({parts}, {:.0} activations, {:.0} loss head, {:.0} process; {}, --batch-tokens {}{}); \
                 `train --probe-memory` measures it at the start",
                if m.full { " (full fine-tuning)" } else { "" },
                b.rows,
                b.tokens,
                b.longest_segment,
                e.total_mb,
                e.activations_mb,
                e.loss_head_mb,
                e.runtime_mb,
                m.dtype,
                m.batch_tokens,
                if m.gradient_checkpointing { ", gradient checkpointing" } else { "" }
            );
        }
        for n in &self.notes {
            println!("  note: {n}");
        }
        println!("  {} error(s), {} warning(s)", self.errors, self.warnings);
    }
}
