//! The flags of the model commands that use a trained adapter (eval, generate, score, merge), each
//! turned into its command's options once. `train`'s own flags are in [`super::train`].

use super::args::{BaseQuantArgs, ComputeArgs, MapArgs};
use crate::commands::{
    bench::BenchOptions, eval::EvalOptions, generate::GenerateOptions, merge::MergeOptions, score::ScoreOptions,
};
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

/// `tunekit bench`'s flags.
#[derive(Args)]
pub struct BenchArgs {
    /// The base model (Hugging Face directory or GGUF file).
    #[arg(long)]
    pub model: PathBuf,
    /// An adapter (run directory) to score beside the base; repeat to compare several.
    #[arg(long = "adapter")]
    pub adapters: Vec<PathBuf>,
    /// Score the adapters only, not the base.
    #[arg(long, requires = "adapters")]
    pub no_base: bool,
    /// lm-evaluation-harness task files (YAML with `dataset_path: json|csv|parquet` and local
    /// `dataset_kwargs.data_files`); repeat or list several.
    #[arg(long, required_unless_present = "held_out", num_args = 1..)]
    pub tasks: Vec<PathBuf>,
    /// A shard directory (from `prepare --eval-fraction`): answer each conversation of its eval
    /// split and score the answer against the one in the data (exact_match, f1, rougeL).
    #[arg(long)]
    pub held_out: Option<PathBuf>,
    /// Longest held-out answer, in tokens.
    #[arg(long, default_value_t = 256, requires = "held_out")]
    pub max_new_tokens: usize,
    /// tokenizer.json / directory / GGUF; default: the model.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Score only the first N documents of each task.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Few-shot examples per document, for every task (default: each task's num_fewshot).
    #[arg(long)]
    pub num_fewshot: Option<usize>,
    /// Render each context with the chat template (the tokenizer's own, or this name or file), as
    /// lm-eval's --apply_chat_template does.
    #[arg(long, num_args = 0..=1, default_missing_value = "")]
    pub apply_chat_template: Option<String>,
    /// With --apply-chat-template: few-shot examples as separate user/assistant turns.
    #[arg(long, requires = "apply_chat_template")]
    pub fewshot_as_multiturn: bool,
    /// Longest sequence (context + answer) in tokens (default: the model's context length).
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Tokens per forward when scoring log-likelihoods.
    #[arg(long, default_value_t = 8192)]
    pub batch_tokens: usize,
    /// Seed of few-shot draws and of sampled answers.
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    /// Write results.json and per-document logs (samples/TASK/SUBJECT.jsonl) here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub compute: ComputeArgs,
    #[command(flatten)]
    pub quant: BaseQuantArgs,
}

impl BenchArgs {
    pub fn options(self) -> BenchOptions {
        BenchOptions {
            placement: self.compute.placement(&self.quant),
            model: self.model,
            adapters: self.adapters,
            no_base: self.no_base,
            tokenizer: self.tokenizer,
            tasks: self.tasks,
            held_out: self.held_out,
            max_new_tokens: self.max_new_tokens,
            limit: self.limit,
            num_fewshot: self.num_fewshot,
            chat_template: self.apply_chat_template.map(|t| Some(t).filter(|t| !t.is_empty())),
            fewshot_as_multiturn: self.fewshot_as_multiturn,
            max_length: self.max_length,
            batch_tokens: self.batch_tokens,
            seed: self.seed,
            out: self.out,
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
