//! `tunekit quickstart`: the main job on the bundled sample, with no arguments: a CSV through a
//! prompt template, chat logs in three formats, prepared into training shards with the Qwen3
//! tokenizer and its chat template, exported + validated as OpenAI fine-tuning JSONL, and a short
//! LoRA run on the shards.

use super::convert::{self, ConvertOptions, ConvertSummary};
use super::export::openai::{self as export, ExportOptions, ExportSummary};
use super::prepare::{self, PrepareOptions, PrepareSummary};
use super::Summary;
use crate::export::openai::{ExportMethod, OverLimit};
use crate::export::validate::{self, ValidationReport};
use crate::ingest::MapOptions;
use anyhow::{bail, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Vocabulary size of the bundled Qwen3 tokenizer (the tiny model's embedding covers it).
fn tokenizer_vocab(ds: &Path) -> Result<usize> {
    Ok(crate::tokenize::TokenizerInfo::load(&ds.join("tokenizers").join("qwen3"))?.vocab_size)
}

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
    pub train: crate::train::TrainSummary,
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
    let export = export::run(&ExportOptions {
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
    // 4. A short LoRA run on those shards. No checkpoint ships with the repository, so the base is a
    //    tiny randomly initialised Qwen3-shaped model over the same vocabulary: the loss falls as it
    //    learns the sample's answers, and the adapter comes out in PEFT's format.
    let tiny = out.join("tiny-qwen3-random");
    let config = crate::train::model::config::ModelConfig {
        model_type: "qwen3".into(),
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        head_dim: Some(16),
        vocab_size: tokenizer_vocab(&ds)?,
        rms_norm_eps: 1e-6,
        rope_theta: 1_000_000.0,
        rope_scaling: None,
        rope_parameters: None,
        tie_word_embeddings: true,
        attention_bias: Some(false),
        max_position_embeddings: 2048,
        bos_token_id: None,
        eos_token_id: None,
        hidden_act: Some("silu".into()),
        extra: Default::default(),
    };
    crate::train::io::hf::write_random_model(&config, 0, &tiny)?;
    let train = crate::train::run(
        &crate::train::TrainOptions {
            method: crate::train::Method::Sft,
            model: tiny,
            data: out.join("shards"),
            out: out.join("lora"),
            epochs: 1,
            max_steps: Some(8),
            optim: crate::train::optim::AdamWConfig { lr: 3e-2, ..Default::default() },
            warmup_steps: 1,
            schedule: crate::train::optim::Schedule::Cosine,
            batch_tokens: 1024,
            grad_accum: 1,
            max_grad_norm: 1.0,
            lora: crate::train::adapters::lora::LoraSettings {
                r: 8,
                alpha: 16.0,
                dropout: 0.0,
                rslora: false,
                doubled_gate_up: false,
                train_router: false,
                use_dora: false,
                init: Default::default(),
                targets: crate::train::adapters::lora::ALL_LINEAR.iter().map(|s| s.to_string()).collect(),
            },
            eval_every: 4,
            save_every: 0,
            seed: 0,
            logits_chunk: crate::train::model::LOGITS_CHUNK,
            qlora: None,
            qlora_embeddings: false,
            gradient_checkpointing: false,
            probe_memory: false,
            tensorboard: false,
            device: Default::default(),
            dtype: Default::default(),
            rl: Default::default(),
            router_aux_loss_coef: None,
            full: false,
        },
        None,
    )?;
    Ok(QuickstartSummary {
        command: "quickstart",
        out: out.display().to_string(),
        convert,
        prepare,
        export,
        validate,
        train,
    })
}

impl Summary for QuickstartSummary {
    fn print_human(&self) {
        println!("== 1. convert: CSV + prompt template -> conversations");
        self.convert.print_human();
        println!("\n== 2. prepare: dedup, Qwen3 chat template, loss masks, packing -> Parquet shards");
        self.prepare.print_human();
        println!("\n== 3. export openai + validate");
        self.export.print_human();
        self.validate.print_human();
        println!("\n== 4. train: a short LoRA run on the shards (tiny random Qwen3-shaped base, PEFT adapter out)");
        self.train.print_human();
        println!("\nquickstart outputs are under {}", self.out);
        println!("next: tunekit inspect {}/shards --show 0", self.out);
    }
}
