//! The built-in trainer: a differentiable Llama-family model on candle ([`model`], [`ops`], and
//! [`fused`]: layer pieces with hand-written backwards, so the graph keeps only their inputs),
//! LoRA adapters ([`lora`]) saved in PEFT's format ([`peft`]), AdamW and schedules ([`optim`]),
//! shards as training data ([`data`]) and the loop ([`run`]). Weights load from a Hugging Face
//! directory or a GGUF file ([`weights`]).

pub mod config;
pub mod data;
pub mod device;
pub mod dpo;
pub mod fused;
pub mod generate;
pub mod lora;
pub mod merge;
pub mod model;
pub mod ops;
pub mod optim;
pub mod peft;
pub mod quant;
pub mod run;
pub mod weights;
