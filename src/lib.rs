//! tunekit: raw corpora to instruction-tuning data, and adapters trained on it, in one binary.
//!
//! The pipeline, mirrored by the modules below:
//!
//! ```text
//! raw files ──ingest──▶ conversations ──admit (rejects, dedup)──▶ tokenize+mask ──▶ samples ──pack──▶ Parquet shards ──train──▶ PEFT adapter
//!                            └──export──▶ OpenAI JSONL (+ validate)
//! ```
//!
//! Stages, each a library room that knows nothing of the command line:
//! * [`ingest`] reads CSV/TSV, JSONL, JSON arrays and Parquet (optionally gzip/zstd) as rows and maps
//!   each row to a canonical [`record::Conversation`] according to a [`ingest::Format`], then through
//!   the [`quality`] filters; [`record`] also writes conversations back out.
//! * [`admit`] is the front every stage shares after reading: counts, rejects, and [`dedup`]
//!   (exact and MinHash-LSH near duplicates).
//! * [`template`] renders prompt templates and chat templates exactly as transformers does;
//!   [`tokenize`] turns conversations into token ids with loss masks.
//! * [`pack`] bin-packs samples into rows and writes the Parquet shards plus the typed manifest.
//! * [`export`] writes and validates OpenAI fine-tuning JSONL.
//! * [`train`] trains LoRA / QLoRA adapters on the shards (candle): SFT, DPO, reward models.
//! * [`report`] charts and statistics; [`doctor`] checks shards before training (end-of-turn
//!   tokens, BOS, special-token text, vocabulary, truncation, the model's tokenizer and template).
//!
//! Around them: [`commands`] (one file per subcommand: options, run, summary) and [`cli`] (all
//! flags, turned into those options once); [`accounting`] (rejects and the counts that add up:
//! every input row is kept, removed as a duplicate, or rejected with a reason), [`output`] (files
//! that appear only when complete), [`progress`], [`split`] (seeded randomness and the train/eval
//! split) and [`digest`].

pub mod accounting;
pub mod admit;
pub mod cli;
pub mod cluster;
pub mod commands;
pub mod dedup;
pub mod digest;
pub mod doctor;
pub mod export;
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
