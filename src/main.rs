//! The tunekit command line: parse, dispatch, print. All work lives in the library.

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tunekit::ingest::{Format, MapOptions};

// glibc malloc serialises rayon workers on its arena locks when every row allocates; mimalloc does not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tunekit",
    version,
    about = "Instruction tuning in one binary: raw files to training shards, and LoRA/QLoRA/DPO training on them.",
    long_about = "Instruction tuning in one binary: raw files to training shards, and LoRA/QLoRA/DPO training on them.\n\n\
    The flow: convert (raw CSV/JSONL/JSON/Parquet -> conversations) -> dedup -> prepare (chat template, \
    loss masks, tokenize, pack into Parquet shards) -> train (LoRA, QLoRA, DPO; PEFT adapters) -> eval, \
    generate, merge; export/validate write and check OpenAI fine-tuning JSONL.\n\nExit codes: 0 ok, 1 data or IO error, 2 usage error."
)]
struct Cli {
    /// No progress bars or warnings.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// Print one JSON object with counts, paths and figures on stdout (for scripts).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

/// How raw rows become conversations (shared by convert, dedup, prepare and export).
#[derive(Args, Clone)]
struct MapArgs {
    /// Input format; `auto` detects it from the columns.
    #[arg(long, value_enum, default_value = "auto")]
    format: Format,
    /// Add this system message to every conversation that has none.
    #[arg(long)]
    system: Option<String>,
    /// Rename columns: `field=column[,field=column]`, e.g. `instruction=question,output=answer`.
    #[arg(long = "map", value_name = "FIELD=COLUMN")]
    renames: Vec<String>,
    /// Prompt template over the row's columns (minijinja), e.g. "Translate into {{ lang }}: {{ text }}".
    #[arg(long)]
    prompt: Option<String>,
    /// Completion template over the row's columns, e.g. "{{ translation }}".
    #[arg(long)]
    completion: Option<String>,
    /// Prompt template file with `prompt`/`completion` (and optional `system`) blocks, or a built-in:
    /// alpaca, question-answer, translation, summarization, classification.
    #[arg(long = "prompt-template", value_name = "NAME|FILE")]
    prompt_template: Option<String>,
    /// Stop at the first bad row (exit 1) instead of writing it to rejects.jsonl.
    #[arg(long)]
    strict: bool,
}

impl MapArgs {
    fn options(&self) -> Result<MapOptions> {
        Ok(MapOptions {
            format: Some(self.format),
            system: self.system.clone(),
            renames: MapOptions::parse_renames(&self.renames)?,
            prompt: self.prompt.clone(),
            completion: self.completion.clone(),
            template: self.prompt_template.clone(),
        })
    }
}

/// Deduplication options (shared by dedup, prepare and export).
#[derive(Args, Clone)]
struct DedupArgs {
    /// near: exact + MinHash-LSH near duplicates; exact: normalised exact matches; none: keep all.
    #[arg(long = "dedup", value_enum, default_value = "near")]
    mode: tunekit::dedup::DedupMode,
    /// Text compared: the whole conversation, the prompt side, or the answers.
    #[arg(long = "dedup-key", value_enum, default_value = "conversation")]
    key: tunekit::dedup::DedupKey,
    /// Estimated Jaccard similarity at or above which two rows are near duplicates.
    #[arg(long, default_value_t = 0.8)]
    threshold: f64,
    /// Words per shingle.
    #[arg(long, default_value_t = 5)]
    ngram: usize,
    /// MinHash permutations (a multiple of --bands).
    #[arg(long, default_value_t = 126)]
    num_perm: usize,
    /// LSH bands (126 permutations in 21 bands of 6 rows: a pair at similarity 0.8 becomes a
    /// candidate with probability 0.998).
    #[arg(long, default_value_t = 21)]
    bands: usize,
    /// Also ignore punctuation when comparing exactly.
    #[arg(long)]
    strip_punctuation: bool,
}

impl DedupArgs {
    fn options(&self, seed: u64) -> Result<tunekit::dedup::DedupOptions> {
        if self.bands == 0 || !self.num_perm.is_multiple_of(self.bands) {
            anyhow::bail!("--num-perm ({}) must be a multiple of --bands ({})", self.num_perm, self.bands);
        }
        if !(0.0..=1.0).contains(&self.threshold) {
            anyhow::bail!("--threshold must be between 0 and 1");
        }
        let mut o = tunekit::dedup::DedupOptions {
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

#[derive(Args, Clone)]
struct ComputeArgs {
    /// Where to compute: auto (a GPU if this build has CUDA and one is present, else the CPU), cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Compute dtype of the frozen base and activations: auto (bf16 on a GPU, f32 on the CPU), f32, bf16.
    /// Adapters, gradients and optimizer state are f32 always.
    #[arg(long, default_value = "auto")]
    dtype: String,
}

/// The frozen base as a QLoRA run held it, for commands that use a trained adapter.
#[derive(Args, Clone)]
struct BaseQuantArgs {
    /// Hold the base's projections in 4 bits as `train --qlora` did (nf4, or gguf: a GGUF file's own blocks),
    /// so that a QLoRA adapter is evaluated over the base it was trained on. Default: full precision.
    #[arg(long)]
    qlora: Option<String>,
}

#[derive(Args)]
struct TrainArgs {
    /// Base model: a Hugging Face directory (config.json + safetensors) or a GGUF file.
    #[arg(long)]
    model: PathBuf,
    /// Shard directory from `tunekit prepare`.
    #[arg(long)]
    data: PathBuf,
    /// Output directory: adapter (PEFT format), checkpoints, metrics.jsonl, loss.png.
    #[arg(long)]
    out: PathBuf,
    /// sft: LoRA on the shards' labels; dpo: direct preference optimisation on preference shards
    /// (`prepare --method preference`), the reference being the base with the adapter off; reward: a
    /// reward model (scalar head on the last token, Bradley-Terry loss, LoRA on the body).
    #[arg(long, default_value = "sft")]
    method: String,
    /// DPO: strength of the KL constraint to the reference.
    #[arg(long, default_value_t = 0.1)]
    beta: f64,
    /// DPO loss: sigmoid (DPO), hinge (SLiC), ipo.
    #[arg(long, value_enum, default_value = "sigmoid")]
    dpo_loss: tunekit::train::dpo::DpoLoss,
    #[arg(long, default_value_t = 1)]
    epochs: u64,
    #[arg(long)]
    max_steps: Option<u64>,
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    #[arg(long, default_value_t = 0)]
    warmup_steps: u64,
    #[arg(long, value_enum, default_value = "cosine")]
    schedule: tunekit::train::optim::Schedule,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Tokens per micro-batch (packed rows are grouped up to this many tokens).
    #[arg(long, default_value_t = 4096)]
    batch_tokens: usize,
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    #[arg(long, default_value_t = 8)]
    lora_r: usize,
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f64,
    #[arg(long, default_value_t = 0.0)]
    lora_dropout: f64,
    /// Modules to adapt: a comma list (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj) or all-linear.
    #[arg(long, default_value = "all-linear")]
    target: String,
    /// rsLoRA scaling (alpha / sqrt(r)).
    #[arg(long)]
    rslora: bool,
    /// Evaluate on the eval shards every N steps (0 = never).
    #[arg(long, default_value_t = 50)]
    eval_every: u64,
    /// Write a checkpoint every N steps (0 = only at the end).
    #[arg(long, default_value_t = 0)]
    save_every: u64,
    /// QLoRA: keep the frozen projections in 4 bits (nf4: NormalFloat4, blocks of 64, double-quantised scales).
    #[arg(long)]
    qlora: Option<String>,
    /// With --qlora: hold the token embedding and lm_head in NF4 too (the QLoRA paper and PEFT keep them
    /// full precision, the default); saves most on small models, whose embedding is a large share.
    #[arg(long)]
    qlora_embeddings: bool,
    /// Keep only each layer's input during the forward and recompute one layer at a time in the backward:
    /// activation memory of one layer instead of all, for about a third more compute (SFT).
    #[arg(long)]
    gradient_checkpointing: bool,
    #[command(flatten)]
    compute: ComputeArgs,
    /// Continue from a checkpoint directory (OUT/checkpoint-N).
    #[arg(long)]
    resume: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Options from a TOML file with the same keys as the flags (lr = 1e-3, lora_r = 16,
    /// target = "all-linear", ...); flags given on the command line win.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ExportTarget {
    /// OpenAI chat fine-tuning JSONL (SFT) or preference JSONL (DPO).
    ///
    /// Writes OUT (rolling over to OUT-00001.jsonl... under --max-file-mb), OUT_validation.jsonl
    /// with --eval-fraction, rejects.jsonl and duplicates.jsonl beside it.
    Openai {
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        /// sft: {"messages": ...}; dpo: {"input", "preferred_output", "non_preferred_output"}.
        #[arg(long, value_enum, default_value = "sft")]
        method: tunekit::export::openai::ExportMethod,
        /// Target model: picks the token encoding and the per-example token limit.
        #[arg(long, default_value = tunekit::export::tokens::DEFAULT_MODEL)]
        model: String,
        /// Examples over the model's token limit: drop them or remove trailing turns.
        #[arg(long, value_enum, default_value = "drop")]
        too_long: tunekit::export::openai::OverLimit,
        /// Share of examples written to the validation file (no near duplicates across the two).
        #[arg(long, default_value_t = 0.0)]
        eval_fraction: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Largest output file in MB (the platform accepts up to 512 MB per file).
        #[arg(long, default_value_t = 512)]
        max_file_mb: u64,
        #[command(flatten)]
        dedup: DedupArgs,
        #[command(flatten)]
        map: MapArgs,
    },
}

#[derive(Subcommand)]
enum ValidateTarget {
    /// Format errors with line numbers, token statistics, and the epochs/billing estimate.
    /// Exit 0 when the file would be accepted, 1 when not.
    Openai {
        /// One file, or all the parts of one dataset (export rolls over to OUT-00001.jsonl, ...).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(long, default_value = tunekit::export::tokens::DEFAULT_MODEL)]
        model: String,
        /// Epochs for the billing estimate (default: the platform's rule for this many examples).
        #[arg(long)]
        epochs: Option<u64>,
        /// How many problems to list (all are counted).
        #[arg(long, default_value_t = 50)]
        max_problems: usize,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Raw CSV/TSV/JSONL/JSON/Parquet (optionally .gz/.zst) to canonical conversations (.jsonl or .parquet).
    ///
    /// Formats: alpaca, dolly, sharegpt, messages, prompt-completion, preference, text, or your own
    /// columns through --prompt/--completion templates. Bad rows go to rejects.jsonl beside the output.
    Convert {
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Output file: .jsonl or .parquet.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        map: MapArgs,
    },
    /// The main job: convert -> dedup -> chat template + loss masks -> tokenize -> pack into Parquet shards.
    ///
    /// Writes train-*.parquet / eval-*.parquet (input_ids, labels, position_ids, seq_lengths),
    /// rejects.jsonl, duplicates.jsonl and, last, manifest.json with the accounting.
    Prepare {
        /// Raw files (any format convert reads) or canonical conversations.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Output directory for the shards and manifest.
        #[arg(long)]
        out: PathBuf,
        /// tokenizer.json (or .json.gz), or a directory with tokenizer.json and tokenizer_config.json.
        #[arg(long)]
        tokenizer: PathBuf,
        /// Chat template: the tokenizer's own by default; or a built-in (chatml, llama3, mistral,
        /// gemma, phi3, zephyr, alpaca) or a .jinja file.
        #[arg(long)]
        template: Option<String>,
        /// Tokens per packed row.
        #[arg(long, default_value_t = 2048)]
        seq_len: usize,
        #[arg(long, value_enum, default_value = "bfd")]
        pack: tunekit::pack::rows::PackMode,
        /// Which tokens are trained.
        #[arg(long, value_enum, default_value = "assistant")]
        loss: tunekit::tokenize::LossMode,
        /// sft: packed shards; preference: one chosen/rejected pair per row (for DPO / reward models).
        #[arg(long, value_enum, default_value = "sft")]
        method: tunekit::prepare::PrepareMethod,
        /// Share of conversations held out for eval (by a hash of the id and seed).
        #[arg(long, default_value_t = 0.02)]
        eval_fraction: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// What to do with samples longer than --seq-len.
        #[arg(long, value_enum, default_value = "drop")]
        too_long: tunekit::prepare::TooLong,
        #[command(flatten)]
        dedup: DedupArgs,
        #[command(flatten)]
        map: MapArgs,
    },
    /// Show what a shard directory holds: accounting, length histogram (terminal + PNG), fill
    /// ratio, trainable share; --show N decodes row N with the trained text highlighted.
    Inspect {
        dir: PathBuf,
        /// Decode this row (0-based) with trained spans marked.
        #[arg(long)]
        show: Option<usize>,
        /// Split for --show.
        #[arg(long, default_value = "train")]
        split: String,
        /// Tokenizer for --show (default: the one recorded in the manifest).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Where to write the length histogram PNG (default DIR/lengths.png).
        #[arg(long)]
        plot: Option<PathBuf>,
    },
    /// Remove exact and near-duplicate conversations (MinHash-LSH); removed rows go to duplicates.jsonl.
    Dedup {
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Output file: .jsonl or .parquet.
        #[arg(long)]
        out: PathBuf,
        /// Report what would be removed without writing the output.
        #[arg(long)]
        dry_run: bool,
        /// Which row of a cluster stays: the first seen (streaming), or the longest (two passes).
        #[arg(long, value_enum, default_value = "first")]
        keep: tunekit::dedup::run::Keep,
        #[command(flatten)]
        dedup: DedupArgs,
        #[command(flatten)]
        map: MapArgs,
    },
    /// Export conversations as OpenAI fine-tuning JSONL (`export openai INPUT... --out train.jsonl`).
    Export {
        #[command(subcommand)]
        target: ExportTarget,
    },
    /// Check a fine-tuning file the way the platform does (`validate openai FILE.jsonl`).
    Validate {
        #[command(subcommand)]
        target: ValidateTarget,
    },
    /// Train a LoRA/QLoRA adapter on prepared shards (SFT) or preference shards (DPO); PEFT output.
    #[command(args_override_self = true)]
    Train(Box<TrainArgs>),
    /// Loss and perplexity of a model (optionally with an adapter) on the eval shards.
    Eval {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long)]
        data: PathBuf,
        /// Which split: eval or train.
        #[arg(long, default_value = "eval")]
        split: String,
        #[arg(long, default_value_t = 4096)]
        batch_tokens: usize,
        #[command(flatten)]
        compute: ComputeArgs,
        #[command(flatten)]
        quant: BaseQuantArgs,
    },
    /// Generate an answer: renders the chat template and samples with a KV cache.
    Generate {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// tokenizer.json / directory; default: the model directory.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Chat template (default: the tokenizer's own).
        #[arg(long)]
        template: Option<String>,
        /// One prompt; or use --chat for a conversation on the terminal.
        #[arg(long, required_unless_present = "chat")]
        prompt: Option<String>,
        /// Interactive chat: type a message, get an answer; an empty line ends.
        #[arg(long)]
        chat: bool,
        #[arg(long)]
        system: Option<String>,
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[command(flatten)]
        compute: ComputeArgs,
        #[command(flatten)]
        quant: BaseQuantArgs,
    },
    /// Rewards of conversations under a reward model (`train --method reward`): one JSON line per
    /// conversation ({"id", "reward"}; preference records get "chosen" and "rejected").
    Score {
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        #[arg(long)]
        model: PathBuf,
        /// The reward model's adapter directory (with the score head).
        #[arg(long)]
        adapter: PathBuf,
        /// tokenizer.json / directory / GGUF; default: the model.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        #[arg(long)]
        template: Option<String>,
        #[command(flatten)]
        map: MapArgs,
        #[command(flatten)]
        compute: ComputeArgs,
        #[command(flatten)]
        quant: BaseQuantArgs,
    },
    /// Merge an adapter into the base weights and write a Hugging Face model directory.
    Merge {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Run the main job on the bundled sample and print where the outputs are.
    Quickstart {
        /// Output directory.
        #[arg(long, default_value = "out/quickstart")]
        out: PathBuf,
    },
}

/// `train --config FILE.toml`: the file's keys become flags placed before the command line's own,
/// so flags given on the command line win.
fn expand_train_config(args: Vec<String>) -> Result<Vec<String>> {
    let Some(t) = args.iter().position(|a| a == "train") else { return Ok(args) };
    let cfg_path = args.iter().enumerate().skip(t + 1).find_map(|(i, a)| {
        if a == "--config" {
            args.get(i + 1).cloned()
        } else {
            a.strip_prefix("--config=").map(str::to_string)
        }
    });
    let Some(path) = cfg_path else { return Ok(args) };
    let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("cannot read --config {path}: {e}"))?;
    let table: toml::Table = text.parse().map_err(|e| anyhow::anyhow!("--config {path}: not valid TOML: {e}"))?;
    let mut extra = Vec::new();
    for (k, v) in table {
        if k == "config" {
            continue;
        }
        let flag = format!("--{}", k.replace('_', "-"));
        match v {
            toml::Value::Boolean(true) => extra.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::String(s) => extra.extend([flag, s]),
            toml::Value::Integer(i) => extra.extend([flag, i.to_string()]),
            toml::Value::Float(f) => extra.extend([flag, f.to_string()]),
            toml::Value::Array(a) => {
                let items: Vec<String> =
                    a.iter().map(|x| x.as_str().map(str::to_string).unwrap_or_else(|| x.to_string())).collect();
                extra.extend([flag, items.join(",")]);
            }
            other => anyhow::bail!("--config {path}: key '{k}' has an unsupported value {other}"),
        }
    }
    let mut out = args[..=t].to_vec();
    out.extend(extra);
    out.extend(args[t + 1..].iter().cloned());
    Ok(out)
}

fn main() -> ExitCode {
    let args = match expand_train_config(std::env::args().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(args);
    tunekit::progress::set_quiet(cli.quiet || cli.json);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn print<T: serde::Serialize>(json: bool, summary: &T, human: impl FnOnce(&T)) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(summary)?);
    } else {
        human(summary);
    }
    Ok(())
}

fn load_model(
    model: &std::path::Path,
    adapter: Option<&std::path::Path>,
    compute: &ComputeArgs,
    qlora: Option<&str>,
) -> Result<tunekit::train::model::Model> {
    let (device, dtype) = tunekit::train::device::select(&compute.device, &compute.dtype)?;
    let base = tunekit::train::weights::BaseModel::load_with(model, &candle_core::Device::Cpu, qlora)?;
    let mut m = tunekit::train::model::Model::from_base_as(&base, &device, dtype)?;
    if let Some(a) = adapter {
        tunekit::train::peft::load_into(&mut m, a)?;
    }
    Ok(m)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Convert { inputs, out, map } => {
            let opts = tunekit::convert::ConvertOptions { inputs, out, map: map.options()?, strict: map.strict };
            let s = tunekit::convert::run(&opts)?;
            print(cli.json, &s, |s| s.print_human())
        }
        Command::Prepare {
            inputs,
            out,
            tokenizer,
            template,
            seq_len,
            pack,
            loss,
            method,
            eval_fraction,
            seed,
            too_long,
            dedup,
            map,
        } => {
            let mut o = tunekit::prepare::PrepareOptions::new(inputs, out, tokenizer);
            o.method = method;
            o.map = map.options()?;
            o.strict = map.strict;
            o.template = template;
            o.seq_len = seq_len;
            o.pack = pack;
            o.loss = loss;
            o.eval_fraction = eval_fraction;
            o.seed = seed;
            o.too_long = too_long;
            o.dedup = dedup.options(seed)?;
            let s = tunekit::prepare::run(&o)?;
            print(cli.json, &s, |s| s.print_human())
        }
        Command::Dedup { inputs, out, dry_run, keep, dedup, map } => {
            let o = tunekit::dedup::run::DedupRunOptions {
                inputs,
                out,
                dry_run,
                keep,
                map: map.options()?,
                strict: map.strict,
                dedup: dedup.options(0)?,
            };
            let s = tunekit::dedup::run::run(&o)?;
            print(cli.json, &s, |s| s.print_human())
        }
        Command::Export {
            target:
                ExportTarget::Openai { inputs, out, method, model, too_long, eval_fraction, seed, max_file_mb, dedup, map },
        } => {
            let o = tunekit::export::openai::ExportOptions {
                inputs,
                out,
                map: map.options()?,
                strict: map.strict,
                method,
                model: tunekit::export::tokens::model_spec(&model)?,
                over_limit: too_long,
                eval_fraction,
                seed,
                dedup: dedup.options(seed)?,
                max_file_bytes: max_file_mb.max(1) << 20,
            };
            let s = tunekit::export::openai::run(&o)?;
            print(cli.json, &s, |s| s.print_human())
        }
        Command::Validate { target: ValidateTarget::Openai { files, model, epochs, max_problems } } => {
            let spec = tunekit::export::tokens::model_spec(&model)?;
            let r = tunekit::export::validate::validate_files(&files, &spec, epochs, max_problems)?;
            print(cli.json, &r, |r| r.print_human())?;
            if !r.valid {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Inspect { dir, show, split, tokenizer, plot } => {
            let r = tunekit::inspect::run(&dir, show, &split, tokenizer.as_deref(), plot)?;
            print(cli.json, &r, |r| r.print_human())
        }
        Command::Train(a) => {
            let a = *a;
            if !["sft", "dpo", "reward"].contains(&a.method.as_str()) {
                anyhow::bail!("--method {}: use sft, dpo or reward", a.method);
            }
            let opts = tunekit::train::run::TrainOptions {
                model: a.model,
                data: a.data,
                out: a.out,
                epochs: a.epochs,
                max_steps: a.max_steps,
                optim: tunekit::train::optim::AdamWConfig {
                    lr: a.lr,
                    weight_decay: a.weight_decay,
                    ..Default::default()
                },
                warmup_steps: a.warmup_steps,
                schedule: a.schedule,
                batch_tokens: a.batch_tokens,
                grad_accum: a.grad_accum.max(1),
                max_grad_norm: a.max_grad_norm,
                lora: tunekit::train::lora::LoraSettings {
                    r: a.lora_r,
                    alpha: a.lora_alpha,
                    dropout: a.lora_dropout,
                    rslora: a.rslora,
                    targets: tunekit::train::lora::LoraSettings::parse_targets(&a.target)?,
                },
                eval_every: a.eval_every,
                save_every: a.save_every,
                seed: a.seed,
                logits_chunk: tunekit::train::model::LOGITS_CHUNK,
                qlora: a.qlora,
                qlora_embeddings: a.qlora_embeddings,
                gradient_checkpointing: a.gradient_checkpointing,
                device: a.compute.device,
                dtype: a.compute.dtype,
            };
            if a.method == "reward" {
                let v = tunekit::train::dpo::run(&opts, tunekit::train::dpo::Objective::Reward, a.resume.as_deref())?;
                return print(cli.json, &v, |v| println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()));
            }
            if a.method == "dpo" {
                let v = tunekit::train::dpo::run(
                    &opts,
                    tunekit::train::dpo::Objective::Dpo { beta: a.beta, loss: a.dpo_loss },
                    a.resume.as_deref(),
                )?;
                return print(cli.json, &v, |v| println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()));
            }
            let s = tunekit::train::run::run_with_resume(&opts, a.resume.as_deref())?;
            print(cli.json, &s, |s| s.print_human())
        }
        Command::Eval { model, adapter, data, split, batch_tokens, compute, quant } => {
            let m = load_model(&model, adapter.as_deref(), &compute, quant.qlora.as_deref())?;
            tunekit::train::data::check_manifest(&data, m.config.vocab_size)?;
            let shards = tunekit::train::data::Shards::load(&data, &split)?;
            let (loss, tokens) =
                tunekit::train::run::evaluate(&m, &shards, batch_tokens, tunekit::train::model::LOGITS_CHUNK)?;
            let v = serde_json::json!({"command": "eval", "split": split, "loss": loss, "perplexity": loss.exp(), "tokens": tokens});
            print(cli.json, &v, |v| {
                println!("{split}: loss {:.4}, perplexity {:.3} over {} trained tokens", loss, loss.exp(), v["tokens"])
            })
        }
        Command::Generate {
            model,
            adapter,
            tokenizer,
            template,
            prompt,
            chat,
            system,
            max_tokens,
            temperature,
            top_p,
            seed,
            compute,
            quant,
        } => {
            let m = load_model(&model, adapter.as_deref(), &compute, quant.qlora.as_deref())?;
            let tok_path = tokenizer.unwrap_or_else(|| model.clone());
            let tok = tunekit::tokenize::TokenizerInfo::load(&tok_path)?;
            let tpl = tunekit::prepare::chat_template(&tok, template.as_deref())?;
            let mut msgs = Vec::new();
            if let Some(s) = system {
                msgs.push(tunekit::record::Message::new("system", s));
            }
            let s = tunekit::train::generate::Sampling { max_tokens, temperature, top_p, seed };
            if chat {
                use std::io::{BufRead, Write};
                let stdin = std::io::stdin();
                loop {
                    eprint!("> ");
                    std::io::stderr().flush()?;
                    let mut line = String::new();
                    if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
                        return Ok(());
                    }
                    msgs.push(tunekit::record::Message::new("user", line.trim()));
                    let answer = tunekit::train::generate::generate(&m, &tok, &tpl, &msgs, &s)?;
                    println!("{answer}");
                    msgs.push(tunekit::record::Message::new("assistant", answer));
                }
            }
            msgs.push(tunekit::record::Message::new("user", prompt.unwrap_or_default()));
            let text = tunekit::train::generate::generate(&m, &tok, &tpl, &msgs, &s)?;
            let v = serde_json::json!({"command": "generate", "text": text});
            print(cli.json, &v, |_| println!("{text}"))
        }
        Command::Score { inputs, model, adapter, tokenizer, template, map, compute, quant } => {
            let m = load_model(&model, Some(&adapter), &compute, quant.qlora.as_deref())?;
            if m.score.is_none() {
                anyhow::bail!(
                    "{}: not a reward model adapter (no score head); train one with --method reward",
                    adapter.display()
                );
            }
            let tok = tunekit::tokenize::TokenizerInfo::load(&tokenizer.unwrap_or_else(|| model.clone()))?;
            let tpl = tunekit::prepare::chat_template(&tok, template.as_deref())?;
            let reward = |msgs: &[tunekit::record::Message]| -> Result<f64> {
                let text = tpl.render(msgs, None, false).map_err(|e| anyhow::anyhow!("chat template: {e:#}"))?;
                let ids: Vec<i32> = tok
                    .tokenizer
                    .encode(text.as_str(), false)
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .get_ids()
                    .iter()
                    .map(|&t| t as i32)
                    .collect();
                Ok(m.reward(&ids)?.to_scalar::<f32>()? as f64)
            };
            let (mut n, mut sum) = (0u64, 0.0);
            tunekit::ingest::stream_conversations(&inputs, &map.options()?, |batch| {
                for item in batch.items {
                    let tunekit::ingest::Item::Ok(c) = item else { continue };
                    let line = match (&c.chosen, &c.rejected) {
                        (Some(ch), Some(rj)) => {
                            let with = |a: &tunekit::record::Message| [c.messages.clone(), vec![a.clone()]].concat();
                            let (rc, rr) = (reward(&with(ch))?, reward(&with(rj))?);
                            sum += rc;
                            serde_json::json!({"id": c.id, "chosen": rc, "rejected": rr, "prefers_chosen": rc > rr})
                        }
                        _ => {
                            let r = reward(&c.messages)?;
                            sum += r;
                            serde_json::json!({"id": c.id, "reward": r})
                        }
                    };
                    n += 1;
                    println!("{line}");
                }
                Ok(())
            })?;
            if !cli.json {
                eprintln!("scored {n} conversation(s), mean reward {:.4}", sum / n.max(1) as f64);
            }
            Ok(())
        }
        Command::Merge { model, adapter, out } => {
            // Merging is exact in f32 on the CPU.
            let cpu = ComputeArgs { device: "cpu".into(), dtype: "f32".into() };
            let m = load_model(&model, Some(&adapter), &cpu, None)?;
            let n = tunekit::train::merge::write_hf(&m, &out)?;
            let v = serde_json::json!({"command": "merge", "out": out.display().to_string(), "merged_modules": n});
            print(cli.json, &v, |_| println!("merged {n} LoRA module(s) into {}", out.display()))
        }
        Command::Quickstart { out } => {
            let s = tunekit::quickstart::run(&out)?;
            print(cli.json, &s, |s| s.print_human())
        }
    }
}
