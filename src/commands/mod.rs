//! The subcommands, one file each: its options, its run (calling the library stages) and its
//! summary. Stages never import from here; `main.rs` parses flags into these options (`cli`), runs
//! the command and prints its [`Summary`].

pub mod bench;
pub mod convert;
pub mod dedup;
pub mod doctor;
pub mod eval;
pub mod export;
pub mod generate;
pub mod inspect;
pub mod merge;
pub mod merge_parts;
pub mod parts;
pub mod prepare;
pub mod quickstart;
pub mod report;
pub mod score;
pub mod train;
pub mod validate;

use serde::Serialize;

/// What a command reports: one JSON object on stdout with `--json`, these lines otherwise.
pub trait Summary: Serialize {
    fn print_human(&self);
}

/// Prints a summary as `--json` asks.
pub fn print<T: Summary>(json: bool, summary: &T) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(summary)?);
    } else {
        summary.print_human();
    }
    Ok(())
}
