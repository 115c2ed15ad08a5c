//! The command line, all flags in one place: the top-level [`Cli`] and its [`Command`]s; the
//! flags of each command in [`data`] (convert, prepare, dedup, inspect, export, validate),
//! [`train`] and [`model`] (eval, generate, score, merge), the groups they share in [`args`],
//! and the `--config` expansion in [`config`]. Each command's flags become its options once
//! (`options()`); the commands themselves are in `crate::commands`.

pub mod args;
pub mod config;
pub mod data;
pub mod model;
pub mod train;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// An error found while the options are built that is about the data, not the flags (an
/// evaluation set that cannot be read): exit 1, not the usage error's 2.
#[derive(Debug)]
pub struct InputError(pub anyhow::Error);

impl std::fmt::Display for InputError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for InputError {}

#[derive(Parser)]
#[command(
    name = "tunekit",
    version,
    about = "Instruction tuning in one binary: raw files to training shards, LoRA/QLoRA, DPO, reward models, GRPO and PPO \
    on them, and the result out to llama.cpp and Ollama.",
    long_about = "Instruction tuning in one binary: raw files to training shards, LoRA/QLoRA, DPO, reward models, GRPO and PPO \
    on them, and the result out to llama.cpp and Ollama.\n\n\
    The flow: convert (raw CSV/JSONL/JSON/Parquet/spreadsheets -> conversations) -> dedup -> prepare (chat template, \
    loss masks, tokenize, pack into Parquet shards) -> doctor, inspect, report -> train (LoRA, QLoRA, DPO, reward \
    models, GRPO, PPO; PEFT adapters) -> eval, generate, score, merge -> export gguf / ollama (llama.cpp, Ollama); \
    export/validate openai write and check OpenAI fine-tuning JSONL.\n\n\
    Exit codes: 0 ok, 1 data or IO error, 2 usage error."
)]
pub struct Cli {
    /// No progress bars or warnings.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Print one JSON object with counts, paths and figures on stdout (for scripts).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Raw CSV/TSV/JSONL/JSON/Parquet (optionally .gz/.zst) to canonical conversations (.jsonl or .parquet).
    ///
    /// Formats: alpaca, dolly, sharegpt, messages, prompt-completion, preference, text, or your own
    /// columns through --prompt/--completion templates. Bad rows go to rejects.jsonl beside the output.
    #[command(args_override_self = true)]
    Convert(data::ConvertArgs),
    /// The main job: convert -> dedup -> chat template + loss masks -> tokenize -> pack into Parquet shards.
    ///
    /// Writes train-*.parquet / eval-*.parquet (input_ids, labels, position_ids, seq_lengths),
    /// rejects.jsonl, duplicates.jsonl and, last, manifest.json with the accounting.
    #[command(args_override_self = true)]
    Prepare(data::PrepareArgs),
    /// Show what a shard directory holds: accounting, length histogram (terminal + PNG), fill
    /// ratio, trainable share; --show N decodes row N with the trained text highlighted.
    Inspect(data::InspectArgs),
    /// Check shards before training: untrained end-of-turn tokens, doubled or missing BOS,
    /// special-token text in answers, ids beyond the vocabulary, truncated answers; with --model,
    /// its tokenizer and template compared and the memory of the largest micro-batch.
    ///
    /// Exit 1 when it finds errors, 0 with warnings only.
    Doctor(data::DoctorArgs),
    /// One self-contained HTML report (inline SVG charts, no network) of shard and run directories:
    /// accounting, length histogram, rejects by reason, decoded rows, loss/lr/grad-norm/throughput/
    /// memory and the method's own metrics; several runs overlaid.
    Report(data::ReportArgs),
    /// Join the parts of a sharded prepare (`prepare --rank R --world-size W`, or Slurm array /
    /// Kubernetes indexed-job tasks) into the directory one process would have written: duplicates
    /// across parts, the same split, shards and one manifest with the summed accounting.
    ///
    /// A rank does not tokenize rows that duplicate an earlier row of its own share; should the whole
    /// input keep one of them (rare), the merge tokenizes it with the tokenizer the ranks used, which
    /// must then still be at that path, unchanged.
    MergeParts(data::MergePartsArgs),
    /// Remove exact and near-duplicate conversations (MinHash-LSH); removed rows go to duplicates.jsonl.
    #[command(args_override_self = true)]
    Dedup(data::DedupCommandArgs),
    /// Export conversations as OpenAI fine-tuning JSONL (`export openai`), or an adapter / merged model
    /// as GGUF for llama.cpp (`export gguf`) and with an Ollama Modelfile (`export ollama`).
    Export {
        #[command(subcommand)]
        target: data::ExportTarget,
    },
    /// Check a fine-tuning file the way the platform does (`validate openai FILE.jsonl`).
    Validate {
        #[command(subcommand)]
        target: data::ValidateTarget,
    },
    /// Train a LoRA/QLoRA adapter on prepared shards (SFT), DPO or a reward model on preference
    /// shards, or GRPO/PPO on prompt shards; PEFT output.
    #[command(args_override_self = true, after_long_help = DATA_PARALLEL_HELP)]
    Train(Box<train::TrainArgs>),
    /// Loss and perplexity of a model (optionally with an adapter) on the eval shards.
    Eval(model::EvalArgs),
    /// Generate an answer: renders the chat template and samples with a KV cache.
    Generate(model::GenerateArgs),
    /// Score lm-evaluation-harness task files (multiple choice, generation) on the base model and
    /// each adapter, side by side with differences and standard errors.
    Bench(model::BenchArgs),
    /// Rewards of conversations under a reward model (`train --method reward`): one JSON line per
    /// conversation ({"id", "reward"}; preference records get "chosen" and "rejected").
    #[command(args_override_self = true)]
    Score(model::ScoreArgs),
    /// Merge an adapter into the base weights and write a Hugging Face model directory.
    Merge(model::MergeArgs),
    /// Run the main job on the bundled sample and print where the outputs are.
    Quickstart {
        /// Output directory.
        #[arg(long, default_value = "out/quickstart")]
        out: PathBuf,
    },
}

/// `tunekit train --help`'s closing section: how to run it on more than one process.
const DATA_PARALLEL_HELP: &str = "\
Data parallel (every method): start the ranks with a launcher; each reads its place from it.
  CPUs, MPI (--features mpi):   mpirun -np 4 tunekit train ...   or   srun --ntasks=4 tunekit train ...
  GPUs, NCCL (--features nccl): torchrun --nproc-per-node 8 --no-python tunekit train ...   or   srun ...
Each optimizer step takes --grad-accum x world-size micro-batches; rank 0 alone writes the outputs.
Environment: TUNEKIT_BACKEND=mpi|nccl (override the choice), NCCL_COMM_ID=host:port (where NCCL's ranks
meet; default MASTER_ADDR with MASTER_PORT + 1), TUNEKIT_NCCL_ID_FILE=/shared/path (meet through a file
instead), TUNEKIT_COLLECTIVE_TIMEOUT=600 (seconds a rank waits for its peers before failing).";
