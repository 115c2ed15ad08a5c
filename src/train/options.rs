//! What a training run is told: the base and data, the method and its objective's parameters, the
//! optimizer, batch and adapter settings, and where to compute. The same options, serialised, go
//! into every checkpoint.

use crate::train::adapters::lora::LoraSettings;
use crate::train::device::{DeviceSpec, Precision, Qlora};
use crate::train::objectives::dpo::Dpo;
use crate::train::objectives::grpo::Grpo;
use crate::train::objectives::kto::Kto;
use crate::train::objectives::orpo::Orpo;
use crate::train::objectives::ppo::Ppo;
use crate::train::objectives::rloo::Rloo;
use crate::train::objectives::simpo::Simpo;
use crate::train::optim::{AdamWConfig, Schedule};
use crate::train::rewards::RewardSpec;
use crate::train::rollout::SamplingParams;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The training method, with its objective's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "name")]
pub enum Method {
    /// Token cross-entropy on the shards' labels.
    #[default]
    Sft,
    /// Direct preference optimisation on preference shards, the reference being the base with the
    /// adapter off.
    Dpo(Dpo),
    /// A reward model: scalar head on the last token, Bradley-Terry loss, LoRA on the body.
    Reward,
    /// ORPO on preference shards: the chosen answer's NLL plus an odds-ratio term; no reference.
    Orpo(Orpo),
    /// SimPO on preference shards: a length-normalised margin with a target; no reference.
    Simpo(Simpo),
    /// KTO on unpaired shards: each answer desirable or not, against a reference point from
    /// mismatched pairs; the reference is the base with the adapter off.
    Kto(Kto),
    /// Group relative policy optimisation on prompt shards, with rule or model rewards.
    Grpo(Grpo),
    /// REINFORCE leave-one-out on prompt shards: the KL as a reward penalty, one ratio per completion.
    Rloo(Rloo),
    /// RLHF: PPO against a reward, with a per-token KL penalty to the reference and a value head.
    Ppo(Ppo),
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Method::Sft => "sft",
            Method::Dpo(_) => "dpo",
            Method::Reward => "reward",
            Method::Orpo(_) => "orpo",
            Method::Simpo(_) => "simpo",
            Method::Kto(_) => "kto",
            Method::Grpo(_) => "grpo",
            Method::Rloo(_) => "rloo",
            Method::Ppo(_) => "ppo",
        }
    }
}

/// What online RL (GRPO, PPO) samples and how it scores it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RlOptions {
    /// Prompts of one rollout (one optimizer step for GRPO).
    pub prompts_per_step: usize,
    /// Completions sampled per prompt.
    pub num_generations: usize,
    pub sampling: SamplingParams,
    /// `--reward` specs (`match:COLUMN`, `regex:PATTERN`, `json`, `length:N`, `model:DIR`,
    /// `command:CMD`, each optionally `*W`).
    pub rewards: Vec<RewardSpec>,
    /// Seconds a reward command may take for one batch.
    pub reward_timeout: f64,
    /// The tokenizer the prompts were prepared with (default: the one the manifest records).
    pub tokenizer: Option<PathBuf>,
}

impl Default for RlOptions {
    fn default() -> Self {
        RlOptions {
            prompts_per_step: 4,
            num_generations: 8,
            sampling: SamplingParams { temperature: 1.0, top_p: 1.0, top_k: 0, max_new_tokens: 256 },
            rewards: vec![],
            reward_timeout: 60.0,
            tokenizer: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainOptions {
    /// What to optimise: sft, dpo (with its beta and loss) or reward.
    #[serde(default)]
    pub method: Method,
    pub model: PathBuf,
    pub data: PathBuf,
    pub out: PathBuf,
    pub epochs: u64,
    pub max_steps: Option<u64>,
    pub optim: AdamWConfig,
    pub warmup_steps: u64,
    pub schedule: Schedule,
    pub batch_tokens: usize,
    pub grad_accum: usize,
    pub max_grad_norm: f64,
    pub lora: LoraSettings,
    pub eval_every: u64,
    pub save_every: u64,
    pub seed: u64,
    pub logits_chunk: usize,
    /// QLoRA: hold the frozen projections in 4 bits; None = full precision.
    #[serde(default)]
    pub qlora: Option<Qlora>,
    /// QLoRA: also hold the token embedding and lm_head in NF4 (default: full precision).
    #[serde(default)]
    pub qlora_embeddings: bool,
    /// Keep only each layer's input in the forward and recompute layer by layer in the backward.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Run the most memory-hungry micro-batch once before step 1 (an out-of-memory comes at once).
    #[serde(default)]
    pub probe_memory: bool,
    /// `--report-to tensorboard`: event files under OUT/tensorboard/ beside metrics.jsonl.
    #[serde(default)]
    pub tensorboard: bool,
    /// Where to compute (auto: a GPU when built with CUDA and one is present).
    #[serde(default)]
    pub device: DeviceSpec,
    /// Compute dtype (auto: bf16 on a GPU, f32 on the CPU).
    #[serde(default)]
    pub dtype: Precision,
    /// Online RL: sampling and rewards.
    #[serde(default)]
    pub rl: RlOptions,
    /// A mixture of experts' load-balancing loss coefficient, instead of the config's
    /// (`router_aux_loss_coef` where `output_router_logits` is true, else 0, as transformers).
    #[serde(default)]
    pub router_aux_loss_coef: Option<f64>,
    /// Full fine-tuning: every weight trained (f32 master weights), no adapter; the run directory
    /// is a Hugging Face model directory.
    #[serde(default)]
    pub full: bool,
}
