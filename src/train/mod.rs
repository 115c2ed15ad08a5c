//! The built-in trainer, on candle.
//!
//! * [`options`] what a run is told; [`trainer`] the loop every method shares; [`recipes`] one
//!   file per method (sft, dpo, reward, grpo, ppo) over it; [`objectives`] the losses, as values.
//! * [`model`] a differentiable Llama-family model, one file per piece, each piece a graph node
//!   with a hand-written backward ([`graph`]); [`adapters`] what training adds to it (LoRA, a reward
//!   head).
//! * [`data`] shards as training data; [`optim`] AdamW, clipping and the schedule; [`device`] where
//!   it computes; [`cpu`] the CPU kernels of our own.
//! * [`io`] weights in and out: Hugging Face and GGUF bases, PEFT adapters, merged models,
//!   checkpoints.
//! * [`rollout`] the rollout engine: batched sampling with a KV cache (RL, and `generate`);
//!   [`rewards`] the reward functions of online RL.

pub mod adapters;
pub mod cpu;
pub mod data;
pub mod device;
pub mod graph;
pub mod io;
pub mod model;
pub mod objectives;
pub mod optim;
pub mod options;
pub mod recipes;
pub mod rewards;
pub mod rollout;
pub mod trainer;

pub use options::{Method, TrainOptions};
pub use recipes::run;
pub use trainer::TrainSummary;
