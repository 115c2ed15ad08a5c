//! tunekit: raw corpora to instruction-tuning data, in one binary.
//!
//! The pipeline, mirrored by the modules below:
//!
//! ```text
//! raw files ──ingest/convert──▶ conversations ──dedup──▶ conversations ──tokenize+mask──▶ samples ──pack──▶ Parquet shards ──train──▶ PEFT adapter
//!                                      └──export──▶ OpenAI JSONL (+ validate)
//! ```
//!
//! * [`ingest`] reads CSV/TSV, JSONL, JSON arrays and Parquet (optionally gzip/zstd) as rows and maps
//!   each row to a canonical [`record::Conversation`] according to a [`ingest::Format`].
//! * [`convert`] streams rows through a format mapping into conversation files, with rejects.
//! * [`dedup`] removes exact and near duplicates (MinHash-LSH) and says which row each one duplicates.
//! * [`tokenize`] renders chat templates exactly as transformers does and derives loss masks.
//! * [`pack`] bin-packs samples into rows and writes the Parquet shards plus `manifest.json`.
//! * [`export`] writes and validates OpenAI fine-tuning JSONL.
//! * [`train`] trains LoRA / QLoRA adapters on the shards (candle) and writes them in PEFT's format.
//!
//! Every stage accounts for every input row: kept, removed as a duplicate, or rejected with a reason.

pub mod accounting;
pub mod convert;
pub mod dedup;
pub mod export;
pub mod ingest;
pub mod inspect;
pub mod output;
pub mod pack;
pub mod plot;
pub mod prepare;
pub mod prepare_preference;
pub mod progress;
pub mod quickstart;
pub mod record;
pub mod split;
pub mod template;
pub mod tokenize;
pub mod train;

/// Version string written into manifests.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
