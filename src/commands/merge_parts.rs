//! `tunekit merge-parts DIR`: the parts a sharded prepare's ranks left under DIR/parts/, checked
//! to be one complete job, replayed into the shards, side files and manifest of DIR (prepare) or
//! into the deduplicated file and its side files (dedup).

use crate::parts::part::read_parts;
use anyhow::{bail, Result};
use std::path::Path;

/// What was merged: a shard directory or a deduplicated file, summarised as its command does.
pub enum Merged {
    Prepare(super::prepare::PrepareSummary),
    Dedup(super::dedup::DedupSummary),
}

pub fn run(dir: &Path) -> Result<Merged> {
    let metas = read_parts(dir)?;
    let _lock = crate::output::DirLock::acquire(dir, "tunekit merge-parts")?;
    match metas[0].command.as_str() {
        "prepare" => Ok(Merged::Prepare(super::prepare::sft::merge(dir, metas)?)),
        "dedup" => Ok(Merged::Dedup(super::dedup::merge(dir, metas)?)),
        other => bail!("{}: parts of `{other}`, which merge-parts does not know", dir.display()),
    }
}
