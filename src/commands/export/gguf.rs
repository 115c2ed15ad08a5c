//! `tunekit export gguf --adapter RUN --model BASE --out adapter.gguf`: a trained LoRA adapter as
//! llama.cpp's LoRA GGUF, checked against the base it will be loaded with.

use crate::commands::Summary;
use crate::export::gguf::adapter::{export, AdapterExport, AdapterType};
use anyhow::Result;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

pub struct GgufOptions {
    pub adapter: PathBuf,
    pub model: PathBuf,
    pub out: PathBuf,
    pub ty: AdapterType,
}

#[derive(Debug, Serialize)]
pub struct GgufSummary {
    pub command: &'static str,
    pub out: String,
    #[serde(rename = "type")]
    pub ty: AdapterType,
    #[serde(flatten)]
    pub export: AdapterExport,
    pub seconds: f64,
}

pub fn run(o: &GgufOptions) -> Result<GgufSummary> {
    let start = Instant::now();
    let base = crate::train::io::read_config(&o.model)?;
    let export = export(&o.adapter, &base, o.ty, &o.out)?;
    Ok(GgufSummary {
        command: "export gguf",
        out: o.out.display().to_string(),
        ty: o.ty,
        export,
        seconds: start.elapsed().as_secs_f64(),
    })
}

impl Summary for GgufSummary {
    fn print_human(&self) {
        let e = &self.export;
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
}
