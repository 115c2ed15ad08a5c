//! The tunekit command line: parse, dispatch, print. The flags are in `tunekit::cli`, the commands
//! in `tunekit::commands`; all work lives in the library.

use anyhow::Result;
use clap::Parser;
use std::process::ExitCode;
use tunekit::cli::data::{ExportTarget, ValidateTarget};
use tunekit::cli::{Cli, Command};
use tunekit::commands::{self, print, Summary};

// glibc malloc serialises rayon workers on its arena locks when every row allocates; mimalloc does not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// candle's elementwise ops run on its own worker threads, which spin 25,000 times after each op
/// before sleeping: on a two-core machine the spinning worker takes a core from the GEMM threads
/// that run next (3% of a SmolLM2-shape step's samples). 500 spins still catch back-to-back ops.
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT` in the environment still decides when it is set.
fn short_worker_spins() {
    const SPIN_LIMIT: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(SPIN_LIMIT).is_none() {
        // Before any thread starts: candle reads it when its pool is first used.
        std::env::set_var(SPIN_LIMIT, "500");
    }
}

/// Runs the command on a thread of the pool its parallel loops run on. From outside the pool, each
/// of the thousands of parallel operations of a training step (every product, every fused kernel)
/// hands its work to the pool and puts the calling thread to sleep until woken at the end: three
/// threads on two cores and a sleep and wake-up per operation. On a pool thread the caller works on
/// its own loops (LoRA step at the issue-20 config: 3,540-3,840 -> 4,430-4,530 tokens/s; SmolLM2
/// shapes: 228-248 -> 283-289). The threads get the main thread's stack size (recursive parsers
/// and graph walks run there); `RAYON_NUM_THREADS` still sets their number.
fn on_the_compute_pool<R: Send>(op: impl FnOnce() -> R + Send) -> R {
    match rayon::ThreadPoolBuilder::new().stack_size(MAIN_STACK_BYTES).build() {
        Ok(pool) => pool.install(op),
        Err(_) => op(),
    }
}

/// Linux's default main-thread stack (8 MiB).
const MAIN_STACK_BYTES: usize = 8 << 20;

fn main() -> ExitCode {
    tunekit::allocator::configure();
    short_worker_spins();
    let args = match tunekit::cli::config::expand_config(std::env::args().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(args);
    tunekit::progress::set_quiet(cli.quiet || cli.json);
    match on_the_compute_pool(|| run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(if e.downcast_ref::<Usage>().is_some() { 2 } else { 1 })
        }
    }
}

/// An error in how a command was asked for (a flag's value, flags that do not go together): exit
/// code 2, as clap's own usage errors; data and IO errors exit 1.
#[derive(Debug)]
struct Usage(anyhow::Error);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for Usage {}

/// A command's options, their errors marked as usage errors (except those about the data).
fn usage<T>(options: Result<T>) -> Result<T> {
    options.map_err(|e| if e.is::<tunekit::cli::InputError>() { e } else { Usage(e).into() })
}

fn run(cli: Cli) -> Result<ExitCode> {
    let json = cli.json;
    match cli.command {
        Command::Convert(a) => print(json, &commands::convert::run(&usage(a.options())?)?)?,
        Command::Prepare(a) => {
            let opts = usage(a.options())?;
            match opts.map.share {
                Some(_) => print(json, &commands::prepare::run_part(&opts)?)?,
                None => print(json, &commands::prepare::run(&opts)?)?,
            }
        }
        Command::MergeParts(a) => match commands::merge_parts::run(&a.dir)? {
            commands::merge_parts::Merged::Prepare(s) => print(json, &s)?,
            commands::merge_parts::Merged::Dedup(s) => print(json, &s)?,
        },
        Command::Dedup(a) => {
            let opts = usage(a.options())?;
            match opts.map.share {
                Some(_) => print(json, &commands::dedup::run_part(&opts)?)?,
                None => print(json, &commands::dedup::run(&opts)?)?,
            }
        }
        Command::Export { target: ExportTarget::Openai(a) } => {
            print(json, &commands::export::openai::run(&usage(a.options())?)?)?
        }
        Command::Export { target: ExportTarget::Ollama(a) } => {
            print(json, &commands::export::ollama::run(&a.options())?)?
        }
        Command::Export { target: ExportTarget::Gguf(a) } => print(json, &commands::export::gguf::run(&a.options())?)?,
        Command::Validate { target: ValidateTarget::Openai(a) } => {
            let r = commands::validate::run(&a.options())?;
            print(json, &r)?;
            if !r.valid {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Inspect(a) => {
            print(json, &commands::inspect::run(&a.dir, a.show, &a.split, a.tokenizer.as_deref(), a.plot)?)?
        }
        Command::Report(a) => print(json, &commands::report::run(&a.options())?)?,
        Command::Doctor(a) => {
            let report = commands::doctor::run(&a.options())?;
            print(json, &report)?;
            report.verdict()?
        }
        Command::Train(a) => {
            let resume = a.resume.clone();
            let opts = usage(a.options())?;
            let _membership = tunekit::cluster::join()?;
            let world = tunekit::cluster::world();
            if !world.is_main() {
                tunekit::progress::set_quiet(true);
            }
            match tunekit::train::run(&opts, resume.as_deref()) {
                Ok(s) if world.is_main() => print(json, &s)?,
                Ok(_) => {}
                Err(e) if world.size > 1 => {
                    // The other ranks may be waiting in a collective: stop them all.
                    eprintln!("error: rank {} of {}: {e:#}", world.rank, world.size);
                    world.abort(1);
                    return Ok(ExitCode::from(1)); // said once, with the rank
                }
                Err(e) => return Err(e),
            }
        }
        Command::Eval(a) => print(json, &commands::eval::run(&a.options())?)?,
        Command::Bench(a) => print(json, &commands::bench::run(&a.options())?)?,
        Command::Generate(a) => match &a.prompt {
            Some(p) if !a.chat => print(json, &commands::generate::run(&a.options(), p)?)?,
            _ => commands::generate::chat(&a.options())?,
        },
        Command::Score(a) => {
            let s = commands::score::run(&usage(a.options())?, &mut std::io::stdout().lock())?;
            if !json {
                s.print_human();
            }
        }
        Command::Merge(a) => print(json, &commands::merge::run(&a.options())?)?,
        Command::Quickstart { out } => print(json, &commands::quickstart::run(&out)?)?,
    }
    Ok(ExitCode::SUCCESS)
}
