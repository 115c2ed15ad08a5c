//! tunekit: raw corpora to instruction-tuning data, adapters trained on it, and models out to where
//! people run them, in one binary.
//!
//! The pipeline, mirrored by the modules below:
//!
//! ```text
//! raw files ──ingest──▶ conversations ──admit (rejects, dedup)──▶ tokenize+mask ──▶ samples ──pack──▶ Parquet shards ──train──▶ PEFT adapter ──export──▶ GGUF / Ollama
//!                            └──export──▶ OpenAI JSONL (+ validate)
//! ```
//!
//! Stages, each a library room that knows nothing of the command line:
//! * [`ingest`] reads CSV/TSV, spreadsheets, JSONL, JSON arrays and Parquet (optionally gzip/zstd)
//!   as rows and maps each row to a canonical [`record::Conversation`] according to a
//!   [`ingest::Format`] (one file per format), then through the [`quality`] filters; [`record`]
//!   also writes conversations back out.
//! * [`admit`] is the front every stage shares after reading: counts, rejects, and [`dedup`]
//!   (exact and MinHash-LSH near duplicates).
//! * [`template`] renders prompt templates and chat templates exactly as transformers does;
//!   [`tokenize`] turns conversations into token ids with loss masks.
//! * [`pack`] bin-packs samples into rows and writes the Parquet shards plus the typed manifest.
//! * [`train`] trains LoRA / QLoRA adapters on the shards (candle): SFT, DPO, reward models, and
//!   online RL (GRPO, PPO) with its rollout engine and reward functions.
//! * [`export`] writes and validates OpenAI fine-tuning JSONL, and adapters and merged models as
//!   GGUF for llama.cpp with the Ollama Modelfile beside them; [`gguf`] is llama.cpp's file format
//!   and naming, read and written.
//! * [`report`] charts, statistics and the HTML report; [`doctor`] checks shards before training
//!   (end-of-turn tokens, BOS, special-token text, vocabulary, truncation, the model's tokenizer and
//!   template).
//! * [`cluster`] and [`parts`]: data-parallel training (MPI, NCCL) and data preparation sharded
//!   over ranks, then merged.
//!
//! Around them: [`commands`] (one file per subcommand: options, run, summary) and [`cli`] (all
//! flags, turned into those options once); [`accounting`] (rejects and the counts that add up:
//! every input row is kept, removed as a duplicate, or rejected with a reason), [`output`] (files
//! that appear only when complete, and the lock on an output directory), [`progress`], [`split`]
//! (seeded randomness and the train/eval split), [`digest`] and [`allocator`].

pub mod accounting;
pub mod admit;
pub mod allocator;
pub mod bench;
pub mod cli;
pub mod cluster;
pub mod commands;
pub mod dedup;
pub mod digest;
pub mod doctor;
pub mod export;
pub mod gguf;
pub mod ingest;
pub mod output;
pub mod pack;
pub mod parts;
pub mod progress;
pub mod quality;
pub mod record;
pub mod report;
pub mod split;
pub mod template;
pub mod tokenize;
pub mod train;

/// Version string written into manifests.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
