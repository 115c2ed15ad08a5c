//! The flags of `tunekit train`, turned into [`TrainOptions`] once.

use super::args::ComputeArgs;
use crate::train::adapters::lora::LoraSettings;
use crate::train::objectives::dpo::Dpo;
use crate::train::optim::AdamWConfig;
use crate::train::{Method, TrainOptions};
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

/// `--method`: what to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TrainMethod {
    /// LoRA on the shards' labels.
    Sft,
    /// Direct preference optimisation on preference shards.
    Dpo,
    /// A reward model on preference shards.
    Reward,
}

#[derive(Args)]
pub struct TrainArgs {
    /// Base model: a Hugging Face directory (config.json + safetensors) or a GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    /// Shard directory from `tunekit prepare`.
    #[arg(long)]
    pub data: PathBuf,
    /// Output directory: adapter (PEFT format), checkpoints, metrics.jsonl, loss.png.
    #[arg(long)]
    pub out: PathBuf,
    /// sft: LoRA on the shards' labels; dpo: direct preference optimisation on preference shards
    /// (`prepare --method preference`), the reference being the base with the adapter off; reward: a
    /// reward model (scalar head on the last token, Bradley-Terry loss, LoRA on the body).
    #[arg(long, value_enum, default_value = "sft")]
    pub method: TrainMethod,
    /// DPO: strength of the KL constraint to the reference.
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    /// DPO loss: sigmoid (DPO), hinge (SLiC), ipo.
    #[arg(long, value_enum, default_value = "sigmoid")]
    pub dpo_loss: crate::train::objectives::dpo::DpoLoss,
    #[arg(long, default_value_t = 1)]
    pub epochs: u64,
    #[arg(long)]
    pub max_steps: Option<u64>,
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u64,
    #[arg(long, value_enum, default_value = "cosine")]
    pub schedule: crate::train::optim::Schedule,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Tokens per micro-batch (packed rows are grouped up to this many tokens).
    #[arg(long, default_value_t = 4096)]
    pub batch_tokens: usize,
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 8)]
    pub lora_r: usize,
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f64,
    /// Modules to adapt: a comma list (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj) or all-linear.
    #[arg(long, default_value = "all-linear")]
    pub target: String,
    /// rsLoRA scaling (alpha / sqrt(r)).
    #[arg(long)]
    pub rslora: bool,
    /// Evaluate on the eval shards every N steps (0 = never).
    #[arg(long, default_value_t = 50)]
    pub eval_every: u64,
    /// Write a checkpoint every N steps (0 = only at the end).
    #[arg(long, default_value_t = 0)]
    pub save_every: u64,
    /// QLoRA: keep the frozen projections in 4 bits (nf4: NormalFloat4, blocks of 64, double-quantised scales).
    #[arg(long)]
    pub qlora: Option<String>,
    /// With --qlora: hold the token embedding and lm_head in NF4 too (the QLoRA paper and PEFT keep them
    /// full precision, the default); saves most on small models, whose embedding is a large share.
    #[arg(long)]
    pub qlora_embeddings: bool,
    /// Keep only each layer's input during the forward and recompute one layer at a time in the backward:
    /// activation memory of one layer instead of all, for about a third more compute (SFT).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// Continue from a checkpoint directory (OUT/checkpoint-N).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Options from a TOML file with the same keys as the flags (lr = 1e-3, lora_r = 16,
    /// target = "all-linear", ...); flags given on the command line win.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

impl TrainArgs {
    pub fn options(self) -> Result<TrainOptions> {
        let method = match self.method {
            TrainMethod::Sft => Method::Sft,
            TrainMethod::Dpo => Method::Dpo(Dpo { beta: self.beta, loss: self.dpo_loss }),
            TrainMethod::Reward => Method::Reward,
        };
        Ok(TrainOptions {
            method,
            model: self.model,
            data: self.data,
            out: self.out,
            epochs: self.epochs,
            max_steps: self.max_steps,
            optim: AdamWConfig { lr: self.lr, weight_decay: self.weight_decay, ..Default::default() },
            warmup_steps: self.warmup_steps,
            schedule: self.schedule,
            batch_tokens: self.batch_tokens,
            grad_accum: self.grad_accum.max(1),
            max_grad_norm: self.max_grad_norm,
            lora: LoraSettings {
                r: self.lora_r,
                alpha: self.lora_alpha,
                dropout: self.lora_dropout,
                rslora: self.rslora,
                targets: LoraSettings::parse_targets(&self.target)?,
            },
            eval_every: self.eval_every,
            save_every: self.save_every,
            seed: self.seed,
            logits_chunk: crate::train::model::LOGITS_CHUNK,
            qlora: self.qlora,
            qlora_embeddings: self.qlora_embeddings,
            gradient_checkpointing: self.gradient_checkpointing,
            device: self.compute.device,
            dtype: self.compute.dtype,
        })
    }
}
