//! `tunekit quickstart`: the main job on the bundled sample, with no arguments.

use crate::convert::{self, ConvertOptions, ConvertSummary};
use crate::ingest::MapOptions;
use anyhow::{bail, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The bundled sample: `datasets/` of the source tree (cargo run) or beside the binary.
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
    pub convert: Vec<ConvertSummary>,
}

pub fn run(out: &Path) -> Result<QuickstartSummary> {
    let ds = datasets_dir()?;
    std::fs::create_dir_all(out)?;
    let mut converted = Vec::new();
    // A CSV with its own columns, mapped through a prompt template file.
    let csv = ConvertOptions {
        inputs: vec![ds.join("countries.csv")],
        out: out.join("countries").join("conversations.jsonl"),
        map: MapOptions { template: Some(ds.join("countries.jinja").display().to_string()), ..Default::default() },
        strict: false,
    };
    converted.push(convert::run(&csv)?);
    // Chat logs (messages), alpaca and sharegpt files, formats detected from their columns.
    let chats = ConvertOptions {
        inputs: vec![ds.join("support_chats.jsonl"), ds.join("alpaca_sample.json"), ds.join("sharegpt_sample.json")],
        out: out.join("chats").join("conversations.jsonl"),
        map: MapOptions::default(),
        strict: false,
    };
    converted.push(convert::run(&chats)?);
    Ok(QuickstartSummary { command: "quickstart", out: out.display().to_string(), convert: converted })
}

impl QuickstartSummary {
    pub fn print_human(&self) {
        for c in &self.convert {
            c.print_human();
            println!();
        }
        println!("quickstart outputs are under {}", self.out);
    }
}
