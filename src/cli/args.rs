//! Argument groups several commands share: how raw rows become conversations ([`MapArgs`]),
//! deduplication ([`DedupArgs`]), where a model computes ([`ComputeArgs`]) and how a QLoRA base is
//! held ([`BaseQuantArgs`]).

use crate::ingest::read::ReadOptions;
use crate::ingest::Selection;
use crate::ingest::{Format, MapOptions};
use crate::train::device::{DeviceSpec, Precision};
use crate::train::io::{Placement, Qlora};
use anyhow::Result;
use clap::Args;

/// How raw rows become conversations (shared by convert, dedup, prepare and export).
#[derive(Args, Clone)]
pub struct MapArgs {
    /// Input format; `auto` detects it from the columns.
    #[arg(long, value_enum, default_value = "auto")]
    pub format: Format,
    /// Add this system message to every conversation that has none.
    #[arg(long)]
    pub system: Option<String>,
    /// Rename columns: `field=column[,field=column]`, e.g. `instruction=question,output=answer`.
    #[arg(long = "map", value_name = "FIELD=COLUMN")]
    pub renames: Vec<String>,
    /// Prompt template over the row's columns (minijinja), e.g. "Translate into {{ lang }}: {{ text }}".
    #[arg(long)]
    pub prompt: Option<String>,
    /// Completion template over the row's columns, e.g. "{{ translation }}".
    #[arg(long)]
    pub completion: Option<String>,
    /// Prompt template file with `prompt`/`completion` (and optional `system`) blocks, or a built-in:
    /// alpaca, question-answer, translation, summarization, classification.
    #[arg(long = "prompt-template", value_name = "NAME|FILE")]
    pub prompt_template: Option<String>,
    /// Stop at the first bad row (exit 1) instead of writing it to rejects.jsonl.
    #[arg(long)]
    pub strict: bool,
    /// CSV/TSV field delimiter (one character, or `tab`). Default: detected from the first records
    /// among comma, semicolon, tab and pipe (.tsv files: tab).
    #[arg(long, value_name = "CHAR", help_heading = "Reading files")]
    pub delimiter: Option<String>,
    /// Text encoding of the inputs, e.g. windows-1252, latin-1, iso-8859-15, utf-16le, shift_jis.
    /// Default: UTF-8, or UTF-16 when a file starts with its byte-order mark.
    #[arg(long, value_name = "NAME", help_heading = "Reading files")]
    pub encoding: Option<String>,
    /// The sheet of .xlsx/.xls/.ods inputs to read. Default: the first.
    #[arg(long, value_name = "NAME", help_heading = "Reading files")]
    pub sheet: Option<String>,
    /// A polars SQL query over the inputs before templating: each input is a table named by its file
    /// stem (`data` when there is one), e.g. "SELECT * FROM data WHERE lang = 'fr'" or a JOIN of two
    /// files. Rows it leaves out are counted as filtered. Reads the inputs into memory.
    #[arg(long, value_name = "QUERY", help_heading = "Selecting rows")]
    pub sql: Option<String>,
    /// Keep only the first N rows (after --sql).
    #[arg(long, value_name = "N", help_heading = "Selecting rows")]
    pub limit: Option<usize>,
    /// Keep N rows drawn at random (after --sql), in their order; seeded by --seed.
    #[arg(long, value_name = "N", help_heading = "Selecting rows")]
    pub sample: Option<usize>,
    #[command(flatten)]
    pub quality: QualityArgs,
    /// A TOML file of these flags (`max_answer_words = 400`, `refusals = "default"`, `decontaminate =
    /// ["eval.jsonl"]`, ...); flags on the command line win.
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<std::path::PathBuf>,
}

/// Quality filters: a conversation that fails one is rejected with the rule's reason.
#[derive(Args, Clone, Default)]
#[command(next_help_heading = "Quality filters")]
pub struct QualityArgs {
    /// Fewest words in the prompt side (system + user turns).
    #[arg(long, value_name = "N")]
    pub min_prompt_words: Option<usize>,
    /// Most words in the prompt side.
    #[arg(long, value_name = "N")]
    pub max_prompt_words: Option<usize>,
    /// Fewest words in the answers (assistant turns, the chosen answer).
    #[arg(long, value_name = "N")]
    pub min_answer_words: Option<usize>,
    /// Most words in the answers.
    #[arg(long, value_name = "N")]
    pub max_answer_words: Option<usize>,
    /// Smallest answer/prompt word ratio.
    #[arg(long, value_name = "R")]
    pub min_answer_ratio: Option<f64>,
    /// Largest answer/prompt word ratio.
    #[arg(long, value_name = "R")]
    pub max_answer_ratio: Option<f64>,
    /// Largest share (0-1) of the answer's characters inside repeated word n-grams (Gopher's duplicate
    /// n-gram rule; 0.2 is a common setting), n = --repeated-ngram.
    #[arg(long, value_name = "SHARE")]
    pub max_repeated_share: Option<f64>,
    /// The n of --max-repeated-share.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub repeated_ngram: usize,
    /// Reject answers containing a refusal phrase: `default` (a built-in English list, e.g. "as an AI
    /// language model") or a file with one phrase per line. Matched without regard to case.
    #[arg(long, value_name = "default|FILE")]
    pub refusals: Option<String>,
    /// Reject conversations with an empty or whitespace-only answer turn.
    #[arg(long)]
    pub drop_empty_answers: bool,
    /// Keep only conversations in these languages (comma-separated ISO 639-3 codes: eng, deu, fra,
    /// cmn, spa, ...), identified by whatlang over the prompt and answers together.
    #[arg(long, value_name = "CODES", value_delimiter = ',')]
    pub language: Vec<String>,
    /// Lowest identification confidence (0-1) for --language; a row identified less surely is rejected.
    #[arg(long, value_name = "C", default_value_t = 0.5)]
    pub min_language_confidence: f64,
    /// Evaluation sets (JSONL, JSON, Parquet, CSV, ...) no training row may share word n-grams with;
    /// such rows are rejected as `contaminated`, naming the evaluation row. Repeatable.
    #[arg(long, value_name = "FILE")]
    pub decontaminate: Vec<std::path::PathBuf>,
    /// The evaluation sets' text columns (comma-separated). Default: every text column.
    #[arg(long, value_name = "COLS", value_delimiter = ',')]
    pub decontaminate_columns: Vec<String>,
    /// Words per n-gram of --decontaminate (13, as GPT-3 and lighteval).
    #[arg(long, value_name = "N", default_value_t = 13)]
    pub decontaminate_ngram: usize,
    /// Share (0-1) of a side's n-grams that must be shared to reject it; 0: any shared n-gram.
    #[arg(long, value_name = "SHARE", default_value_t = 0.0)]
    pub decontaminate_min_share: f64,
}

impl QualityArgs {
    pub fn options(&self) -> Result<crate::quality::Quality> {
        let refusals = match self.refusals.as_deref() {
            None => vec![],
            Some("default") => crate::quality::DEFAULT_REFUSALS.iter().map(|s| s.to_string()).collect(),
            Some(f) => std::fs::read_to_string(f)
                .map_err(|e| {
                    anyhow::anyhow!("--refusals {f}: {e} (give `default` or a file of phrases, one per line)")
                })?
                .lines()
                .map(|l| l.trim().to_lowercase())
                .filter(|l| !l.is_empty())
                .collect(),
        };
        if let Some(s) = self.max_repeated_share.filter(|s| !(0.0..=1.0).contains(s)) {
            anyhow::bail!("--max-repeated-share {s}: give a share between 0 and 1");
        }
        let decontaminate = if self.decontaminate.is_empty() {
            None
        } else {
            let mut texts = vec![];
            for f in &self.decontaminate {
                let read = crate::ingest::rows::row_texts(f, &self.decontaminate_columns);
                texts.extend(
                    read.map_err(|e| super::InputError(e.context(format!("--decontaminate {}", f.display()))))?,
                );
            }
            let n = self.decontaminate_ngram.max(1);
            Some(std::sync::Arc::new(crate::quality::decontaminate::EvalIndex::new(
                &texts,
                n,
                self.decontaminate_min_share,
            )))
        };
        Ok(crate::quality::Quality {
            decontaminate,
            prompt_words: (self.min_prompt_words, self.max_prompt_words),
            answer_words: (self.min_answer_words, self.max_answer_words),
            answer_ratio: (self.min_answer_ratio, self.max_answer_ratio),
            max_repeated: self.max_repeated_share,
            repeated_n: self.repeated_ngram,
            refusals,
            drop_empty_answers: self.drop_empty_answers,
            languages: crate::quality::language::parse(&self.language)?,
            min_language_confidence: self.min_language_confidence,
        })
    }
}

impl MapArgs {
    pub fn options(&self) -> Result<MapOptions> {
        Ok(MapOptions {
            format: Some(self.format),
            system: self.system.clone(),
            renames: MapOptions::parse_renames(&self.renames)?,
            prompt: self.prompt.clone(),
            completion: self.completion.clone(),
            template: self.prompt_template.clone(),
            prompts: false,
            labelled: false,
            select: Selection { sql: self.sql.clone(), limit: self.limit, sample: self.sample, seed: 0 },
            quality: self.quality.options()?,
            read: ReadOptions {
                sheet: self.sheet.clone(),
                delimiter: self.delimiter.as_deref().map(ReadOptions::parse_delimiter).transpose()?,
                encoding: self.encoding.as_deref().map(ReadOptions::parse_encoding).transpose()?,
            },
            share: None,
        })
    }
}

/// Deduplication options (shared by dedup, prepare and export).
#[derive(Args, Clone)]
pub struct DedupArgs {
    /// near: exact + MinHash-LSH near duplicates; exact: normalised exact matches; none: keep all.
    #[arg(long = "dedup", value_enum, default_value = "near")]
    pub mode: crate::dedup::DedupMode,
    /// Text compared: the whole conversation, the prompt side, or the answers.
    #[arg(long = "dedup-key", value_enum, default_value = "conversation")]
    pub key: crate::dedup::DedupKey,
    /// Estimated Jaccard similarity at or above which two rows are near duplicates.
    #[arg(long, default_value_t = 0.8)]
    pub threshold: f64,
    /// Words per shingle.
    #[arg(long, default_value_t = 5)]
    pub ngram: usize,
    /// MinHash permutations (a multiple of --bands).
    #[arg(long, default_value_t = 126)]
    pub num_perm: usize,
    /// LSH bands (126 permutations in 21 bands of 6 rows: a pair at similarity 0.8 becomes a
    /// candidate with probability 0.998).
    #[arg(long, default_value_t = 21)]
    pub bands: usize,
    /// Also ignore punctuation when comparing exactly.
    #[arg(long)]
    pub strip_punctuation: bool,
}

impl DedupArgs {
    pub fn options(&self, seed: u64) -> Result<crate::dedup::DedupOptions> {
        if self.bands == 0 || !self.num_perm.is_multiple_of(self.bands) {
            anyhow::bail!("--num-perm ({}) must be a multiple of --bands ({})", self.num_perm, self.bands);
        }
        if !(0.0..=1.0).contains(&self.threshold) {
            anyhow::bail!("--threshold must be between 0 and 1");
        }
        let mut o = crate::dedup::DedupOptions {
            mode: self.mode,
            key: self.key,
            threshold: self.threshold,
            ngram: self.ngram,
            num_perm: self.num_perm,
            bands: self.bands,
            seed: seed.wrapping_add(1),
            ..Default::default()
        };
        o.normalization.strip_punctuation = self.strip_punctuation;
        Ok(o)
    }
}

/// Where a model computes and in what precision (train, eval, generate, score).
#[derive(Args, Clone)]
pub struct ComputeArgs {
    /// Where to compute: auto (a GPU if this build has CUDA and one is present, else the CPU), cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    /// Compute dtype of the frozen base and activations: auto (bf16 on a GPU, f32 on the CPU), f32, bf16.
    /// Adapters, gradients and optimizer state are f32 always.
    #[arg(long, value_enum, default_value = "auto")]
    pub dtype: Precision,
}

/// The frozen base as a QLoRA run held it, for commands that use a trained adapter.
#[derive(Args, Clone)]
pub struct BaseQuantArgs {
    /// Hold the base's projections in 4 bits as `train --qlora` did (nf4, or gguf: a GGUF file's own blocks),
    /// so that a QLoRA adapter is evaluated over the base it was trained on. Default: full precision.
    #[arg(long, value_enum)]
    pub qlora: Option<Qlora>,
}

impl ComputeArgs {
    /// How a command that runs a trained adapter holds its base.
    pub fn placement(&self, quant: &BaseQuantArgs) -> Placement {
        Placement { device: self.device, dtype: self.dtype, qlora: quant.qlora, qlora_embeddings: false }
    }
}
