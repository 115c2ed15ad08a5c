//! The flags of the model commands that use a trained adapter (eval, generate, score, merge), each
//! turned into its command's options once. `train`'s own flags are in [`super::train`].

use super::args::{BaseQuantArgs, ComputeArgs, MapArgs};
use crate::commands::{eval::EvalOptions, generate::GenerateOptions, merge::MergeOptions, score::ScoreOptions};
use crate::train::rollout::SamplingParams;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct EvalArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long)]
    pub data: PathBuf,
    /// Which split: eval or train.
    #[arg(long, default_value = "eval")]
    pub split: String,
    #[arg(long, default_value_t = 4096)]
    pub batch_tokens: usize,
    #[command(flatten)]
    pub compute: ComputeArgs,
    #[command(flatten)]
    pub quant: BaseQuantArgs,
}

impl EvalArgs {
    pub fn options(self) -> EvalOptions {
        EvalOptions {
            placement: self.compute.placement(&self.quant),
            model: self.model,
            adapter: self.adapter,
            data: self.data,
            split: self.split,
            batch_tokens: self.batch_tokens,
        }
    }
}

#[derive(Args)]
pub struct GenerateArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// tokenizer.json / directory; default: the model directory.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Chat template (default: the tokenizer's own).
    #[arg(long)]
    pub template: Option<String>,
    /// One prompt; or use --chat for a conversation on the terminal.
    #[arg(long, required_unless_present = "chat")]
    pub prompt: Option<String>,
    /// Interactive chat: type a message, get an answer; an empty line ends.
    #[arg(long)]
    pub chat: bool,
    #[arg(long)]
    pub system: Option<String>,
    /// Longest answer, in tokens.
    #[arg(long, default_value_t = 128, alias = "max-tokens")]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Sample only among the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub compute: ComputeArgs,
    #[command(flatten)]
    pub quant: BaseQuantArgs,
}

impl GenerateArgs {
    pub fn options(&self) -> GenerateOptions {
        GenerateOptions {
            placement: self.compute.placement(&self.quant),
            model: self.model.clone(),
            adapter: self.adapter.clone(),
            tokenizer: self.tokenizer.clone(),
            template: self.template.clone(),
            system: self.system.clone(),
            sampling: SamplingParams {
                max_new_tokens: self.max_new_tokens,
                temperature: self.temperature,
                top_p: self.top_p,
                top_k: self.top_k,
            },
            seed: self.seed,
        }
    }
}

#[derive(Args)]
pub struct ScoreArgs {
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    #[arg(long)]
    pub model: PathBuf,
    /// The reward model's adapter directory (with the score head); none when --model is itself a
    /// reward model (`train --method reward --full` writes a sequence classifier).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// tokenizer.json / directory / GGUF; default: the model.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long)]
    pub template: Option<String>,
    #[command(flatten)]
    pub map: MapArgs,
    #[command(flatten)]
    pub compute: ComputeArgs,
    #[command(flatten)]
    pub quant: BaseQuantArgs,
}

impl ScoreArgs {
    pub fn options(self) -> Result<ScoreOptions> {
        Ok(ScoreOptions {
            placement: self.compute.placement(&self.quant),
            map: self.map.options()?,
            inputs: self.inputs,
            model: self.model,
            adapter: self.adapter,
            tokenizer: self.tokenizer,
            template: self.template,
        })
    }
}

#[derive(Args)]
pub struct MergeArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub adapter: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
}

impl MergeArgs {
    pub fn options(self) -> MergeOptions {
        MergeOptions { model: self.model, adapter: self.adapter, out: self.out }
    }
}
