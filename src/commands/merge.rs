//! `tunekit merge`: fold an adapter into the base weights and write a Hugging Face model directory.
//! Merging is exact: f32 on the CPU.

use super::Summary;
use crate::train::device::{DeviceSpec, Precision};
use crate::train::io::{load_model, merge::write_hf, Placement};
use anyhow::Result;
use serde::Serialize;
use std::path::PathBuf;

pub struct MergeOptions {
    pub model: PathBuf,
    pub adapter: PathBuf,
    pub out: PathBuf,
}

#[derive(Debug, Serialize)]
pub struct MergeSummary {
    pub command: &'static str,
    pub out: String,
    pub merged_modules: usize,
}

pub fn run(o: &MergeOptions) -> Result<MergeSummary> {
    let exact = Placement { device: DeviceSpec::Cpu, dtype: Precision::F32, ..Default::default() };
    let m = load_model(&o.model, Some(&o.adapter), &exact)?;
    let merged_modules = write_hf(&m, &o.out)?;
    Ok(MergeSummary { command: "merge", out: o.out.display().to_string(), merged_modules })
}

impl Summary for MergeSummary {
    fn print_human(&self) {
        println!("merged {} LoRA module(s) into {}", self.merged_modules, self.out);
    }
}
