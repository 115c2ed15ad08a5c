//! The flags of the data commands (convert, prepare, dedup, inspect, export, validate), each turned
//! into its command's options once.

use super::args::{DedupArgs, MapArgs};
use crate::commands::{
    convert::ConvertOptions, dedup::DedupRunOptions, doctor::DoctorOptions, export::openai::ExportOptions,
    prepare::PrepareOptions,
};
use crate::train::device::Precision;
use crate::train::io::Qlora;
use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Args)]
pub struct ConvertArgs {
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Output file: .jsonl or .parquet.
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of --sample.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub map: MapArgs,
}

impl ConvertArgs {
    pub fn options(self) -> Result<ConvertOptions> {
        let mut map = self.map.options()?;
        map.select.seed = self.seed;
        Ok(ConvertOptions { map, strict: self.map.strict, inputs: self.inputs, out: self.out })
    }
}

#[derive(Args)]
pub struct PrepareArgs {
    /// Raw files (any format convert reads) or canonical conversations.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Output directory for the shards and manifest.
    #[arg(long)]
    pub out: PathBuf,
    /// tokenizer.json (or .json.gz), or a directory with tokenizer.json and tokenizer_config.json.
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Chat template: the tokenizer's own by default; or a built-in (chatml, llama3, mistral,
    /// gemma, phi3, zephyr, alpaca, harmony: gpt-oss's, an assistant message's `thinking` its
    /// analysis channel) or a .jinja file.
    #[arg(long)]
    pub template: Option<String>,
    /// Tokens per packed row (sft), per side of a pair (preference), per row (kto), per prompt (prompts).
    #[arg(long, default_value_t = 2048)]
    pub seq_len: usize,
    #[arg(long, value_enum, default_value = "bfd")]
    pub pack: crate::pack::rows::PackMode,
    /// Which tokens are trained.
    #[arg(long, value_enum, default_value = "assistant")]
    pub loss: crate::tokenize::LossMode,
    /// sft: packed shards; preference: one chosen/rejected pair per row (for DPO, ORPO, SimPO,
    /// reward models); kto: one conversation per row labelled desirable or not (a `label` column,
    /// `--map label=COLUMN`, or pairs split in two); prompts: prompts for online RL (GRPO, PPO), with the rows' other columns for rewards.
    #[arg(long, value_enum, default_value = "sft")]
    pub method: crate::commands::prepare::PrepareMethod,
    /// Share of conversations held out for eval (by a hash of the id and seed).
    #[arg(long, default_value_t = 0.02)]
    pub eval_fraction: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// What to do with samples longer than --seq-len.
    #[arg(long, value_enum, default_value = "drop")]
    pub too_long: crate::pack::fit::TooLong,
    #[command(flatten)]
    pub dedup: DedupArgs,
    #[command(flatten)]
    pub map: MapArgs,
    #[command(flatten)]
    pub shard: ShardArgs,
}

/// A task's share of a sharded prepare or dedup (shared by both).
#[derive(Args)]
pub struct ShardArgs {
    /// This task's rank in a sharded run (0-based; also from SLURM_ARRAY_TASK_ID or
    /// JOB_COMPLETION_INDEX): it handles every world-size-th batch of 4,096 input rows and writes
    /// its part under parts/ (prepare: in --out; dedup: beside --out); `tunekit merge-parts DIR`
    /// joins the parts when all ranks are done.
    #[arg(long)]
    pub rank: Option<usize>,
    /// How many tasks share the inputs (also from SLURM_ARRAY_TASK_COUNT).
    #[arg(long)]
    pub world_size: Option<usize>,
}

impl ShardArgs {
    pub fn share(&self) -> Result<Option<crate::cluster::launch::Share>> {
        crate::cluster::launch::Share::resolve(self.rank, self.world_size)
    }
}

#[derive(Args)]
pub struct MergePartsArgs {
    /// The output directory the ranks wrote their parts under (prepare's --out).
    pub dir: PathBuf,
}

impl PrepareArgs {
    pub fn options(self) -> Result<PrepareOptions> {
        let mut o = PrepareOptions::new(self.inputs, self.out, self.tokenizer);
        o.method = self.method;
        o.map = self.map.options()?;
        o.map.select.seed = self.seed;
        o.strict = self.map.strict;
        o.template = self.template;
        o.seq_len = self.seq_len;
        o.pack = self.pack;
        o.loss = self.loss;
        o.eval_fraction = self.eval_fraction;
        o.seed = self.seed;
        o.too_long = self.too_long;
        o.dedup = self.dedup.options(self.seed)?;
        o.map.share = self.shard.share()?;
        Ok(o)
    }
}

#[derive(Args)]
pub struct DedupCommandArgs {
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Output file: .jsonl or .parquet.
    #[arg(long)]
    pub out: PathBuf,
    /// Report what would be removed without writing the output.
    #[arg(long)]
    pub dry_run: bool,
    /// Which row of a cluster stays: the first seen (streaming), or the longest (two passes).
    #[arg(long, value_enum, default_value = "first")]
    pub keep: crate::commands::dedup::Keep,
    #[command(flatten)]
    pub dedup: DedupArgs,
    #[command(flatten)]
    pub map: MapArgs,
    #[command(flatten)]
    pub shard: ShardArgs,
}

impl DedupCommandArgs {
    pub fn options(self) -> Result<DedupRunOptions> {
        let mut map = self.map.options()?;
        map.share = self.shard.share()?;
        Ok(DedupRunOptions {
            map,
            strict: self.map.strict,
            dedup: self.dedup.options(0)?,
            inputs: self.inputs,
            out: self.out,
            dry_run: self.dry_run,
            keep: self.keep,
        })
    }
}

#[derive(Args)]
pub struct ReportArgs {
    /// Shard directories (prepare's --out) and training run directories (train's --out).
    #[arg(required = true)]
    pub dirs: Vec<PathBuf>,
    /// The HTML file to write.
    #[arg(long, default_value = "report.html")]
    pub out: PathBuf,
}

impl ReportArgs {
    pub fn options(self) -> crate::commands::report::ReportOptions {
        crate::commands::report::ReportOptions { dirs: self.dirs, out: self.out }
    }
}

#[derive(Args)]
pub struct DoctorArgs {
    /// The shard directory (prepare's --out).
    pub dir: PathBuf,
    /// The base model the shards will train (Hugging Face directory or GGUF file): the vocabulary
    /// checked against its size, its tokenizer and chat template compared, and the memory estimated.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The tokenizer the shards were prepared with (default: the one the manifest names).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// The memory estimate's training settings: train's flags of the same names.
    #[arg(long, default_value_t = 4096, help_heading = "Memory estimate (with --model)")]
    pub batch_tokens: usize,
    #[arg(long, default_value_t = 0, help_heading = "Memory estimate (with --model)")]
    pub seed: u64,
    #[arg(long, default_value_t = 8, help_heading = "Memory estimate (with --model)")]
    pub lora_r: usize,
    #[arg(long, help_heading = "Memory estimate (with --model)")]
    pub gradient_checkpointing: bool,
    /// f32 (the CPU) or bf16 (a GPU), as train's --dtype.
    #[arg(long, value_enum, default_value = "f32", help_heading = "Memory estimate (with --model)")]
    pub dtype: Precision,
    /// The frozen projections in 4 bits, as train's --qlora (nf4 or gguf).
    #[arg(long, value_enum, help_heading = "Memory estimate (with --model)")]
    pub qlora: Option<Qlora>,
    /// Full fine-tuning's plan (train --full): every weight in f32 with its gradient and the
    /// optimizer's two moments (f32, or 8-bit with --optim adamw_8bit), no adapter.
    #[arg(long, help_heading = "Memory estimate (with --model)")]
    pub full: bool,
    /// The optimizer train would use (--optim): adamw or adamw_8bit.
    #[arg(long, value_enum, default_value = "adamw", help_heading = "Memory estimate (with --model)")]
    pub optim: crate::train::optim::Optim,
}

impl DoctorArgs {
    pub fn options(self) -> DoctorOptions {
        DoctorOptions {
            dir: self.dir,
            model: self.model,
            tokenizer: self.tokenizer,
            batch_tokens: self.batch_tokens,
            seed: self.seed,
            lora_r: self.lora_r,
            gradient_checkpointing: self.gradient_checkpointing,
            dtype: self.dtype,
            qlora: self.qlora,
            full: self.full.then_some(self.optim),
        }
    }
}

#[derive(Args)]
pub struct InspectArgs {
    pub dir: PathBuf,
    /// Decode this row (0-based) with trained spans marked.
    #[arg(long)]
    pub show: Option<usize>,
    /// Split for --show.
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Tokenizer for --show (default: the one recorded in the manifest).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Where to write the length histogram PNG (default DIR/lengths.png).
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum ExportTarget {
    /// OpenAI chat fine-tuning JSONL (SFT) or preference JSONL (DPO).
    ///
    /// Writes OUT (rolling over to OUT-00001.jsonl... under --max-file-mb), OUT_validation.jsonl
    /// with --eval-fraction, rejects.jsonl and duplicates.jsonl beside it.
    #[command(args_override_self = true)]
    Openai(Box<OpenaiExportArgs>),
    /// A trained LoRA adapter as llama.cpp's LoRA adapter GGUF (llama-cli --lora, Ollama ADAPTER),
    /// or with --merge one model GGUF with the adapter folded in; without --adapter, a full
    /// fine-tune's run directory (--model RUN) as one model GGUF.
    ///
    /// Names and shapes as llama.cpp checks them against the base; Llama/Mistral q/k rows in
    /// llama.cpp's rotary order; an rsLoRA alpha rescaled to llama.cpp's alpha / r. --merge keeps
    /// the GGUF base's metadata and tokenizer and sets the training shards' chat template.
    Gguf(GgufExportArgs),
    /// The adapter GGUF (or with --merge the merged model) and an Ollama Modelfile: FROM, ADAPTER,
    /// the training chat template as Ollama's Go TEMPLATE, its stop tokens, SYSTEM.
    ///
    /// `ollama create NAME -f OUT/Modelfile`. A chat template tunekit cannot translate is an error.
    Ollama(OllamaExportArgs),
}

#[derive(Args)]
pub struct OllamaExportArgs {
    /// The same flags as `export gguf`; --out is the directory for adapter.gguf (or model.gguf)
    /// and the Modelfile, --model the GGUF base, --data also gives the system prompts.
    #[command(flatten)]
    pub export: GgufExportArgs,
}

impl OllamaExportArgs {
    pub fn options(self) -> crate::commands::export::ollama::OllamaOptions {
        crate::commands::export::ollama::OllamaOptions { export: self.export.options() }
    }
}

#[derive(Args)]
pub struct GgufExportArgs {
    /// The training run (or checkpoint) directory with adapter_config.json + adapter_model.safetensors.
    /// Leave it out to write a whole model directory as one GGUF: a `train --full` run as --model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The base the adapter was trained on (Hugging Face directory or GGUF file): shapes and
    /// architecture are checked against it. Without --adapter, the model to write (a full
    /// fine-tune's run directory).
    #[arg(long)]
    pub model: PathBuf,
    /// Output: the .gguf file (export ollama: the directory for it and the Modelfile); written under a
    /// temporary name and renamed when complete.
    #[arg(long)]
    pub out: PathBuf,
    /// Tensor type: of the LoRA matrices (f32, f16, q8_0), or with --merge of the model (also bf16
    /// and q4_k_m, llama.cpp's mix).
    #[arg(long = "type", value_enum, default_value = "f16")]
    pub ty: crate::export::gguf::merged::ModelType,
    /// Write one merged model GGUF (the GGUF base with the adapter folded in, the training shards'
    /// chat template) instead of an adapter.
    #[arg(long)]
    pub merge: bool,
    /// The shards the adapter was trained on, for --merge's chat template (default: the run's recorded --data).
    #[arg(long)]
    pub data: Option<PathBuf>,
}

impl GgufExportArgs {
    pub fn options(self) -> crate::commands::export::gguf::GgufOptions {
        crate::commands::export::gguf::GgufOptions {
            adapter: self.adapter,
            model: self.model,
            out: self.out,
            ty: self.ty,
            merge: self.merge,
            data: self.data,
        }
    }
}

#[derive(Args)]
pub struct OpenaiExportArgs {
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
    /// sft: {"messages": ...}; dpo: {"input", "preferred_output", "non_preferred_output"}.
    #[arg(long, value_enum, default_value = "sft")]
    pub method: crate::export::openai::ExportMethod,
    /// Target model: picks the token encoding and the per-example token limit.
    #[arg(long, default_value = crate::export::tokens::DEFAULT_MODEL)]
    pub model: String,
    /// Examples over the model's token limit: drop them or remove trailing turns.
    #[arg(long, value_enum, default_value = "drop")]
    pub too_long: crate::export::openai::OverLimit,
    /// Share of examples written to the validation file (no near duplicates across the two).
    #[arg(long, default_value_t = 0.0)]
    pub eval_fraction: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Largest output file in MB (the platform accepts up to 512 MB per file).
    #[arg(long, default_value_t = 512)]
    pub max_file_mb: u64,
    #[command(flatten)]
    pub dedup: DedupArgs,
    #[command(flatten)]
    pub map: MapArgs,
}

impl OpenaiExportArgs {
    pub fn options(self) -> Result<ExportOptions> {
        let mut map = self.map.options()?;
        map.select.seed = self.seed;
        Ok(ExportOptions {
            map,
            strict: self.map.strict,
            model: crate::export::tokens::model_spec(&self.model)?,
            dedup: self.dedup.options(self.seed)?,
            inputs: self.inputs,
            out: self.out,
            method: self.method,
            over_limit: self.too_long,
            eval_fraction: self.eval_fraction,
            seed: self.seed,
            max_file_bytes: self.max_file_mb.max(1) << 20,
        })
    }
}

#[derive(Subcommand)]
pub enum ValidateTarget {
    /// Format errors with line numbers, token statistics, and the epochs/billing estimate.
    /// Exit 0 when the file would be accepted, 1 when not.
    Openai(OpenaiValidateArgs),
}

#[derive(Args)]
pub struct OpenaiValidateArgs {
    /// One file, or all the parts of one dataset (export rolls over to OUT-00001.jsonl, ...).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    #[arg(long, default_value = crate::export::tokens::DEFAULT_MODEL)]
    pub model: String,
    /// Epochs for the billing estimate (default: the platform's rule for this many examples).
    #[arg(long)]
    pub epochs: Option<u64>,
    /// How many problems to list (all are counted).
    #[arg(long, default_value_t = 50)]
    pub max_problems: usize,
}

impl OpenaiValidateArgs {
    pub fn options(self) -> crate::commands::validate::ValidateOptions {
        crate::commands::validate::ValidateOptions {
            files: self.files,
            model: self.model,
            epochs: self.epochs,
            max_problems: self.max_problems,
        }
    }
}
