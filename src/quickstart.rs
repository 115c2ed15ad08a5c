//! `tunekit quickstart`: the main job on the bundled sample, with no arguments: a CSV through a
//! prompt template, chat logs in three formats, prepared into training shards with the Qwen3
//! tokenizer and its chat template, and exported + validated as OpenAI fine-tuning JSONL.

use crate::convert::{self, ConvertOptions, ConvertSummary};
use crate::export::openai::{self, ExportMethod, ExportOptions, ExportSummary, OverLimit};
use crate::export::validate::{self, ValidationReport};
use crate::ingest::MapOptions;
use crate::prepare::{self, PrepareOptions, PrepareSummary};
use anyhow::{bail, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The bundled sample: `datasets/` in the working directory or in the source tree.
pub fn datasets_dir() -> Result<PathBuf> {
    let candidates = [PathBuf::from("datasets"), PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("datasets")];
    for c in candidates {
        if c.join("README.md").exists() {
            return Ok(c);
        }
    }
    bail!("cannot find the bundled datasets/ directory; run quickstart from the tunekit source tree")
}

#[derive(Serialize)]
pub struct QuickstartSummary {
    pub command: &'static str,
    pub out: String,
    pub convert: ConvertSummary,
    pub prepare: PrepareSummary,
    pub export: ExportSummary,
    pub validate: ValidationReport,
}

pub fn run(out: &Path) -> Result<QuickstartSummary> {
    let ds = datasets_dir()?;
    std::fs::create_dir_all(out)?;
    // 1. A CSV with its own columns, mapped through a prompt template file.
    let countries = out.join("countries").join("conversations.jsonl");
    let convert = convert::run(&ConvertOptions {
        inputs: vec![ds.join("countries.csv")],
        out: countries.clone(),
        map: MapOptions { template: Some(ds.join("countries.jinja").display().to_string()), ..Default::default() },
        strict: false,
    })?;
    // 2. Those conversations plus chat logs in three formats (detected from their columns),
    //    deduplicated, rendered with Qwen3's chat template, masked, packed into shards.
    let inputs =
        vec![countries, ds.join("support_chats.jsonl"), ds.join("alpaca_sample.json"), ds.join("sharegpt_sample.json")];
    let mut p = PrepareOptions::new(inputs.clone(), out.join("shards"), ds.join("tokenizers").join("qwen3"));
    p.seq_len = 1024;
    p.eval_fraction = 0.1;
    let prepare = prepare::run(&p)?;
    // 3. The same conversations as OpenAI fine-tuning JSONL, then validated like the platform does.
    let model = crate::export::tokens::model_spec(crate::export::tokens::DEFAULT_MODEL)?;
    let export = openai::run(&ExportOptions {
        inputs,
        out: out.join("openai").join("train.jsonl"),
        map: MapOptions::default(),
        strict: false,
        method: ExportMethod::Sft,
        model: model.clone(),
        over_limit: OverLimit::Drop,
        eval_fraction: 0.0,
        seed: 0,
        dedup: Default::default(),
        max_file_bytes: 512 << 20,
    })?;
    let validate = validate::validate(&out.join("openai").join("train.jsonl"), &model, None, 20)?;
    Ok(QuickstartSummary { command: "quickstart", out: out.display().to_string(), convert, prepare, export, validate })
}

impl QuickstartSummary {
    pub fn print_human(&self) {
        println!("== 1. convert: CSV + prompt template -> conversations");
        self.convert.print_human();
        println!("\n== 2. prepare: dedup, Qwen3 chat template, loss masks, packing -> Parquet shards");
        self.prepare.print_human();
        println!("\n== 3. export openai + validate");
        self.export.print_human();
        self.validate.print_human();
        println!("\nquickstart outputs are under {}", self.out);
        println!("next: tunekit inspect {}/shards --show 0", self.out);
    }
}
