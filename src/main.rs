//! The tunekit command line: parse, dispatch, print. All work lives in the library.

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tunekit::ingest::{Format, MapOptions};

#[derive(Parser)]
#[command(
    name = "tunekit",
    version,
    about = "Instruction-tuning data, from raw files to training shards, in one binary.",
    long_about = "Instruction-tuning data, from raw files to training shards, in one binary.\n\n\
    The flow: convert (raw CSV/JSONL/JSON/Parquet -> conversations) -> dedup -> prepare (chat template, \
    loss masks, tokenize, pack into Parquet shards) -> train; export/validate write and check OpenAI \
    fine-tuning JSONL.\n\nExit codes: 0 ok, 1 data or IO error, 2 usage error."
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
    /// Run the main job on the bundled sample and print where the outputs are.
    Quickstart {
        /// Output directory.
        #[arg(long, default_value = "out/quickstart")]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Convert { inputs, out, map } => {
            let opts = tunekit::convert::ConvertOptions {
                inputs,
                out,
                map: map.options()?,
                strict: map.strict,
            };
            let s = tunekit::convert::run(&opts)?;
            print(cli.json, &s, |s| s.print_human())
        }
        Command::Quickstart { out } => {
            let s = tunekit::quickstart::run(&out)?;
            print(cli.json, &s, |s| s.print_human())
        }
    }
}
