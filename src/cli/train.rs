//! The flags of `tunekit train`, turned into [`TrainOptions`] once.

use super::args::ComputeArgs;
use crate::train::adapters::lora::LoraSettings;
use crate::train::io::Qlora;
use crate::train::objectives::dpo::Dpo;
use crate::train::objectives::grpo::Grpo;
use crate::train::objectives::kto::Kto;
use crate::train::objectives::orpo::Orpo;
use crate::train::objectives::ppo::Ppo;
use crate::train::objectives::rloo::Rloo;
use crate::train::objectives::simpo::Simpo;
use crate::train::optim::AdamWConfig;
use crate::train::options::RlOptions;
use crate::train::rewards::RewardSpec;
use crate::train::rollout::SamplingParams;
use crate::train::{Method, TrainOptions};
use anyhow::{bail, Result};
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
    /// ORPO on preference shards (NLL + odds ratio, no reference model).
    Orpo,
    /// SimPO on preference shards (length-normalised margin, no reference model).
    Simpo,
    /// KTO on unpaired shards (each answer labelled desirable or not; TRL's KTOTrainer).
    Kto,
    /// Group relative policy optimisation on prompt shards.
    Grpo,
    /// REINFORCE leave-one-out on prompt shards (TRL's RLOOTrainer).
    Rloo,
    /// RLHF: PPO against a reward model, with a KL penalty to the reference.
    Ppo,
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
    /// (`prepare --method preference`), the reference being the base with the adapter off; orpo and
    /// simpo: reference-free preference training on the same shards (TRL's ORPOTrainer, CPOTrainer
    /// with loss_type simpo); kto: answers labelled desirable or undesirable, not in pairs
    /// (`prepare --method kto`; TRL's KTOTrainer), the reference the base with the adapter off; reward: a reward model (scalar head on the last token, Bradley-Terry loss, LoRA on the body); grpo and
    /// rloo and ppo: online RL on prompt shards (`prepare --method prompts`) with --reward functions.
    #[arg(long, value_enum, default_value = "sft")]
    pub method: TrainMethod,
    /// Strength of the KL constraint to the reference: DPO (default 0.1), GRPO (default 0: no
    /// reference pass), KTO (default 0.1, TRL's), RLOO's KL penalty on the rewards (default 0.05, TRL's); ORPO's weight of the odds-ratio term (default 0.1, TRL's); SimPO's reward
    /// scale (default 2.0, the SimPO paper's; TRL's CPOConfig defaults to 0.1).
    #[arg(long)]
    pub beta: Option<f64>,
    /// DPO loss: sigmoid (DPO), hinge (SLiC), ipo.
    #[arg(long, value_enum, default_value = "sigmoid")]
    pub dpo_loss: crate::train::objectives::dpo::DpoLoss,
    /// SimPO's target reward margin gamma (TRL's simpo_gamma): the loss is
    /// -log sigmoid(beta (avg log p(chosen) - avg log p(rejected)) - gamma).
    #[arg(long, default_value_t = 0.5)]
    pub simpo_gamma: f64,
    /// SimPO: add this weight times the chosen answer's NLL (CPO's behaviour cloning; TRL's CPO
    /// default is 1, SimPO's paper uses 0).
    #[arg(long, default_value_t = 0.0)]
    pub cpo_alpha: f64,
    /// KTO: the weight of desirable answers' losses (TRL's desirable_weight). With unequal classes,
    /// weight them so that desirable x count is 1 to 4/3 of undesirable x count (a warning says when not).
    #[arg(long, default_value_t = 1.0)]
    pub desirable_weight: f64,
    /// KTO: the weight of undesirable answers' losses (TRL's undesirable_weight).
    #[arg(long, default_value_t = 1.0)]
    pub undesirable_weight: f64,
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
    /// How AdamW keeps its two moments: adamw (f32, torch's AdamW), or adamw_8bit (8 bits per
    /// value in blocks of 256 with a scale each, as bitsandbytes' AdamW8bit: a quarter of the
    /// memory; tensors under 4,096 values keep f32). CPU only for now.
    #[arg(long, value_enum, default_value = "adamw")]
    pub optim: crate::train::optim::Optim,
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
    /// LoRA+: train the B matrices at this multiple of --lr (A at --lr), as PEFT's
    /// create_loraplus_optimizer groups them (1-D parameters, a router's bias, with B and not
    /// decayed). The paper suggests 16; the adapter is plain LoRA.
    #[arg(long, value_name = "RATIO")]
    pub loraplus_lr_ratio: Option<f64>,
    /// Full fine-tuning: train every weight (f32 master weights and AdamW states; no adapter). The
    /// output directory is then a Hugging Face model directory (sharded safetensors, config,
    /// tokenizer, generation config) that transformers loads and `--model` takes. SFT, DPO (its
    /// reference's log-probabilities computed from the base before training) and reward models (a
    /// ...ForSequenceClassification directory: `score --model RUN`, `--reward model:RUN`) for now.
    #[arg(long)]
    pub full: bool,
    /// DoRA (PEFT's use_dora): each adapted row's direction from W + s B A and its length a trained
    /// magnitude, `y = m / ||W + s B A||_row * (x W^T + s x A^T B^T)`, the norm detached as PEFT does.
    /// Written as PEFT's adapter (lora_magnitude_vector); merged and exported to GGUF with --merge.
    #[arg(long)]
    pub dora: bool,
    /// How the adapter starts (PEFT's init_lora_weights): default (A random, B zero), pissa (A and B
    /// from the r principal singular triplets of each weight, the base left as the residual
    /// W - s B A: faster convergence; exact SVD), pissa_niter_N (the same by a randomised SVD with
    /// N iterations: seconds on large models), or olora (from W's QR factors). The saved adapter is
    /// converted to plain LoRA of rank 2r on the original base (PEFT's
    /// path_initial_model_for_weight_conversion), so merge, export gguf, eval and PEFT take it as any.
    #[arg(long, default_value = "default", value_parser = crate::train::adapters::lora_init::LoraInit::parse)]
    pub lora_init: crate::train::adapters::lora_init::LoraInit,
    /// Evaluate on the eval shards every N steps (0 = never).
    #[arg(long, default_value_t = 50)]
    pub eval_every: u64,
    /// Write a checkpoint every N steps (0 = only at the end).
    #[arg(long, default_value_t = 0)]
    pub save_every: u64,
    /// QLoRA: keep the frozen projections in 4 bits (nf4: NormalFloat4, blocks of 64, double-quantised
    /// scales; gguf: a GGUF base's own quantised blocks).
    #[arg(long, value_enum)]
    pub qlora: Option<Qlora>,
    /// With --qlora: hold the token embedding and lm_head in NF4 too (the QLoRA paper and PEFT keep them
    /// full precision, the default); saves most on small models, whose embedding is a large share.
    #[arg(long)]
    pub qlora_embeddings: bool,
    /// Keep only each layer's input during the forward and recompute one layer at a time in the backward:
    /// activation memory of one layer instead of all, for about a third more compute (SFT).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Mixtures of experts: the router's load-balancing loss coefficient in the SFT objective
    /// (default: the config's router_aux_loss_coef when its output_router_logits is true, else 0,
    /// as transformers trains; the loss is logged as aux_loss either way).
    #[arg(long, value_name = "COEF")]
    pub router_aux_loss_coef: Option<f64>,
    /// Mixtures of experts: train each router in full beside the adapters (PEFT's modules_to_save;
    /// default: the routers stay frozen).
    #[arg(long)]
    pub train_router: bool,
    /// Before step 1, run the largest micro-batch of the epoch (forward and backward, gradients
    /// dropped; the run is unchanged), so an out-of-memory comes at once rather than at step 5,000;
    /// the summary reports the peak memory after it.
    #[arg(long)]
    pub probe_memory: bool,
    /// Also report to: tensorboard (event files under OUT/tensorboard/: every metric of
    /// metrics.jsonl as a scalar per step, the options as text; `tensorboard --logdir OUT`).
    #[arg(long, value_enum, default_value = "none")]
    pub report_to: ReportTo,
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// Continue from a checkpoint directory (OUT/checkpoint-N).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub rl: RlArgs,
    #[command(flatten)]
    pub grpo: GrpoArgs,
    #[command(flatten)]
    pub ppo: PpoArgs,
    /// Options from a TOML file with the same keys as the flags (lr = 1e-3, lora_r = 16,
    /// target = "all-linear", ...); flags given on the command line win.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Online RL (grpo, ppo): what a rollout samples and how it is scored.
#[derive(Args)]
#[command(next_help_heading = "Online RL (grpo, ppo)")]
pub struct RlArgs {
    /// Reward of each completion, repeatable, weighted with a trailing *W: match:COLUMN (the final
    /// answer equals the prompt row's COLUMN, number-aware), regex:PATTERN, json, length:N (closer to
    /// N words is higher), model:DIR (a reward model from --method reward), command:CMD (a program
    /// reading one JSON object per line on stdin, writing one number per line).
    #[arg(long = "reward", value_name = "SPEC")]
    pub rewards: Vec<RewardSpec>,
    /// Seconds a reward command may take for one rollout.
    #[arg(long, default_value_t = 60.0)]
    pub reward_timeout: f64,
    /// Prompts sampled per rollout.
    #[arg(long, default_value_t = 4)]
    pub prompts_per_step: usize,
    /// Completions sampled per prompt (GRPO's group).
    #[arg(long, default_value_t = 8)]
    pub num_generations: usize,
    /// Longest completion; one that reaches it without an end-of-turn token is truncated.
    #[arg(long, default_value_t = 256, alias = "max-completion-tokens")]
    pub max_new_tokens: usize,
    /// Sampling temperature (also the one the log-probabilities are taken at, as TRL does).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// The tokenizer the prompts were prepared with (default: the one their manifest records).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

/// GRPO's objective.
#[derive(Args)]
#[command(next_help_heading = "GRPO")]
pub struct GrpoArgs {
    /// Clipping of the probability ratio (lower side; the upper too unless --epsilon-high).
    #[arg(long, default_value_t = 0.2)]
    pub epsilon: f64,
    #[arg(long)]
    pub epsilon_high: Option<f64>,
    /// How the loss is aggregated over tokens and completions, as TRL defines each.
    #[arg(long, value_enum, default_value = "dapo")]
    pub loss_type: crate::train::objectives::grpo::GrpoLoss,
    /// Advantages divided by the group's reward std, the batch's, or not at all.
    #[arg(long, value_enum, default_value = "group")]
    pub scale_rewards: crate::train::objectives::grpo::ScaleRewards,
    /// Optimizer steps per rollout (the rollout's log-probabilities kept for the ratio).
    #[arg(long, default_value_t = 1)]
    pub num_iterations: usize,
    /// With --beta: multiply the KL term by the probability ratio (its gradient is then the unbiased
    /// reverse-KL gradient), as TRL does by default.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub kl_bias_correction: bool,
    /// token: a probability ratio per token (GRPO); sequence: one per completion, the exp of its
    /// tokens' mean log-ratio (GSPO; TRL's importance_sampling_level, best with --loss-type grpo).
    #[arg(long, value_enum, default_value = "token")]
    pub importance_sampling_level: ImportanceSampling,
    /// RLOO: normalise the leave-one-out advantages over the rollout (mean 0, std 1), as TRL's
    /// normalize_advantages.
    #[arg(long)]
    pub normalize_advantages: bool,
    /// Leave completions cut at --max-new-tokens out of the loss (their rewards still shape the
    /// group's advantages), as TRL's mask_truncated_completions.
    #[arg(long)]
    pub mask_truncated_completions: bool,
}

/// GRPO's importance ratio: per token or per completion (GSPO).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ImportanceSampling {
    Token,
    Sequence,
}

/// PPO's objective.
#[derive(Args)]
#[command(next_help_heading = "PPO")]
pub struct PpoArgs {
    /// Per-token KL penalty in the reward.
    #[arg(long, default_value_t = 0.05)]
    pub kl_coef: f64,
    #[arg(long, value_enum, default_value = "k1")]
    pub kl_estimator: crate::train::objectives::ppo::KlEstimator,
    #[arg(long, default_value_t = 1.0)]
    pub gamma: f64,
    #[arg(long, default_value_t = 0.95)]
    pub lam: f64,
    #[arg(long, default_value_t = 0.2)]
    pub cliprange: f64,
    #[arg(long, default_value_t = 0.2)]
    pub cliprange_value: f64,
    #[arg(long, default_value_t = 0.1)]
    pub vf_coef: f64,
    /// Passes over each rollout.
    #[arg(long, default_value_t = 4)]
    pub ppo_epochs: usize,
    /// Optimizer steps per pass.
    #[arg(long, default_value_t = 1)]
    pub num_mini_batches: usize,
    /// Subtracted from the score of a completion without an end-of-turn token.
    #[arg(long)]
    pub missing_eos_penalty: Option<f64>,
    #[arg(long)]
    pub whiten_rewards: bool,
}

impl TrainArgs {
    pub fn options(self) -> Result<TrainOptions> {
        let (g, p) = (&self.grpo, &self.ppo);
        if self.lora_dropout > 0.0 && !matches!(self.method, TrainMethod::Sft) {
            // The preference and RL objectives compare the policy with itself (the reference, the
            // sampling policy, old log-probs): they are computed without dropout, as the parity checks are.
            let name = clap::ValueEnum::to_possible_value(&self.method).map(|v| v.get_name().to_string());
            bail!("--lora-dropout applies to SFT runs only; leave it at 0 for --method {}", name.unwrap_or_default());
        }
        if let Some(r) = self.loraplus_lr_ratio.filter(|r| !(r.is_finite() && *r > 0.0)) {
            bail!("--loraplus-lr-ratio {r}: B's learning rate is a positive multiple of A's (PEFT suggests 16)");
        }
        if self.full {
            if let Some(q) = self.qlora {
                bail!(
                    "--full trains every weight in f32; --qlora {} freezes the base in 4 bits for adapters: \
                     choose one",
                    clap::ValueEnum::to_possible_value(&q).map(|v| v.get_name().to_string()).unwrap_or_default()
                );
            }
            if self.qlora_embeddings {
                bail!("--full trains the embedding in f32; drop --qlora-embeddings");
            }
            if self.loraplus_lr_ratio.is_some() {
                bail!("--loraplus-lr-ratio sets the learning rate of LoRA's B matrices; --full trains no adapter");
            }
            if self.dora {
                bail!("--dora is a kind of LoRA adapter; --full trains every weight and no adapter: choose one");
            }
            if self.lora_init.mutates_base() {
                bail!(
                    "--lora-init {} starts a LoRA adapter; --full trains every weight and no adapter: choose one",
                    self.lora_init.peft_name()
                );
            }
            if !matches!(
                self.method,
                TrainMethod::Sft | TrainMethod::Dpo | TrainMethod::Reward | TrainMethod::Orpo | TrainMethod::Simpo
            ) {
                bail!(
                    "--full supports --method sft, dpo, reward, orpo and simpo for now; train {} with LoRA adapters (leave out --full)",
                    clap::ValueEnum::to_possible_value(&self.method)
                        .map(|v| v.get_name().to_string())
                        .unwrap_or_default()
                );
            }
        }
        let method = match self.method {
            TrainMethod::Sft => Method::Sft,
            TrainMethod::Dpo => Method::Dpo(Dpo { beta: self.beta.unwrap_or(0.1), loss: self.dpo_loss }),
            TrainMethod::Reward => Method::Reward,
            TrainMethod::Orpo => Method::Orpo(Orpo { beta: self.beta.unwrap_or(0.1) }),
            TrainMethod::Simpo => Method::Simpo(Simpo {
                beta: self.beta.unwrap_or(2.0),
                gamma: self.simpo_gamma,
                cpo_alpha: self.cpo_alpha,
            }),
            TrainMethod::Kto => {
                for (flag, w) in [("desirable", self.desirable_weight), ("undesirable", self.undesirable_weight)] {
                    if !(w.is_finite() && w > 0.0) {
                        bail!("--{flag}-weight {w}: a loss weight is a positive number");
                    }
                }
                Method::Kto(Kto {
                    beta: self.beta.unwrap_or(0.1),
                    desirable_weight: self.desirable_weight,
                    undesirable_weight: self.undesirable_weight,
                })
            }
            TrainMethod::Grpo => Method::Grpo(Grpo {
                epsilon: g.epsilon,
                epsilon_high: g.epsilon_high.unwrap_or(g.epsilon),
                beta: self.beta.unwrap_or(0.0),
                loss: g.loss_type,
                scale_rewards: g.scale_rewards,
                num_iterations: g.num_iterations.max(1),
                kl_bias_correction: g.kl_bias_correction,
                sequence_level: g.importance_sampling_level == ImportanceSampling::Sequence,
                mask_truncated: g.mask_truncated_completions,
            }),
            TrainMethod::Rloo => Method::Rloo(Rloo {
                epsilon: g.epsilon,
                epsilon_high: g.epsilon_high.unwrap_or(g.epsilon),
                beta: self.beta.unwrap_or(0.05),
                num_iterations: g.num_iterations.max(1),
                normalize_advantages: g.normalize_advantages,
            }),
            TrainMethod::Ppo => Method::Ppo(Ppo {
                kl_coef: p.kl_coef,
                kl_estimator: p.kl_estimator,
                gamma: p.gamma,
                lam: p.lam,
                cliprange: p.cliprange,
                cliprange_value: p.cliprange_value,
                vf_coef: p.vf_coef,
                ppo_epochs: p.ppo_epochs.max(1),
                num_mini_batches: p.num_mini_batches.max(1),
                missing_eos_penalty: p.missing_eos_penalty,
                whiten_rewards: p.whiten_rewards,
            }),
        };
        let r = &self.rl;
        let rl = RlOptions {
            prompts_per_step: r.prompts_per_step,
            num_generations: r.num_generations,
            sampling: SamplingParams {
                temperature: r.temperature,
                top_p: r.top_p,
                top_k: r.top_k,
                max_new_tokens: r.max_new_tokens,
            },
            rewards: r.rewards.clone(),
            reward_timeout: r.reward_timeout,
            tokenizer: r.tokenizer.clone(),
        };
        Ok(TrainOptions {
            method,
            model: self.model,
            data: self.data,
            out: self.out,
            epochs: self.epochs,
            max_steps: self.max_steps,
            optim: AdamWConfig {
                lr: self.lr,
                weight_decay: self.weight_decay,
                loraplus_lr_ratio: self.loraplus_lr_ratio,
                optim: self.optim,
                ..Default::default()
            },
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
                doubled_gate_up: false,
                train_router: self.train_router,
                use_dora: self.dora,
                init: self.lora_init,
                targets: LoraSettings::parse_targets(&self.target)?,
            },
            eval_every: self.eval_every,
            save_every: self.save_every,
            seed: self.seed,
            logits_chunk: crate::train::model::LOGITS_CHUNK,
            qlora: self.qlora,
            qlora_embeddings: self.qlora_embeddings,
            gradient_checkpointing: self.gradient_checkpointing,
            probe_memory: self.probe_memory,
            tensorboard: self.report_to == ReportTo::Tensorboard,
            device: self.compute.device,
            dtype: self.compute.dtype,
            rl,
            router_aux_loss_coef: self.router_aux_loss_coef,
            full: self.full,
        })
    }
}

/// Where else `train` reports its metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportTo {
    None,
    Tensorboard,
}
