//! `prepare`/`dedup --rank R --world-size W`: what one task of a sharded run reports. The
//! part's digest is of the command line (less the rank and world size, which a part records itself,
//! and the flags that only change what is printed) and the inputs' sizes and modification
//! times, so a rerun of the same job keeps the parts that are complete and redoes the rest.

use crate::cluster::launch::Share;
use crate::commands::Summary;
use crate::parts::part::PartMeta;
use anyhow::Result;
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// The global flags that change what a command prints, not what it writes: ranks may differ in them.
const OUTPUT_FLAGS: &[&str] = &["-q", "--quiet", "--json"];

/// The digest every part of one job shares.
pub fn part_digest(inputs: &[std::path::PathBuf]) -> Result<String> {
    let mut args: Vec<String> = vec![];
    let mut skip = false;
    for a in std::env::args().skip(1) {
        if skip {
            skip = false;
        } else if a == "--rank" || a == "--world-size" {
            skip = true;
        } else if !a.starts_with("--rank=") && !a.starts_with("--world-size=") && !OUTPUT_FLAGS.contains(&a.as_str()) {
            args.push(a);
        }
    }
    let mut text = args.join("\u{1f}");
    for p in inputs {
        let m = std::fs::metadata(p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?;
        let mtime = m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
        text.push_str(&format!("\u{1f}{}:{}:{:?}", p.display(), m.len(), mtime));
    }
    Ok(format!("{:016x}", xxhash_rust::xxh3::xxh3_64(text.as_bytes())))
}

/// What a rank's prepare reports.
#[derive(Debug, Serialize)]
pub struct PartSummary {
    pub command: &'static str,
    pub rank: usize,
    pub world_size: usize,
    pub part: String,
    /// The part was complete from an earlier run of the same job, and kept.
    pub kept_complete: bool,
    pub batches: u64,
    pub rows: u64,
    /// prepare: conversations not tokenized here because they duplicate an earlier row of this share.
    pub set_aside: u64,
    pub seconds: f64,
}

impl PartSummary {
    /// The summary of the part `meta` under `root` (the directory merge-parts is given).
    pub fn of(root: &Path, meta: &PartMeta, kept: bool, start: Instant) -> PartSummary {
        let share = Share { rank: meta.rank, world_size: meta.world_size };
        PartSummary {
            command: if meta.command == "dedup" { "dedup" } else { "prepare" },
            rank: meta.rank,
            world_size: meta.world_size,
            part: share.dir(root).display().to_string(),
            kept_complete: kept,
            batches: meta.blocks,
            rows: meta.rows,
            set_aside: meta.set_aside,
            seconds: start.elapsed().as_secs_f64(),
        }
    }
}

impl Summary for PartSummary {
    fn print_human(&self) {
        let what = if self.kept_complete { "kept (complete from an earlier run)" } else { "prepared" };
        println!(
            "rank {} of {}: part {what}: {} rows in {} batch(es), {:.1}s",
            self.rank, self.world_size, self.rows, self.batches, self.seconds
        );
        if self.set_aside > 0 {
            println!("  set aside:  {} duplicate(s) of earlier rows of this share, not tokenized", self.set_aside);
        }
        println!("  part:       {}", self.part);
        println!(
            "  when every rank is done: tunekit merge-parts {}",
            Path::new(&self.part).parent().and_then(Path::parent).map_or(String::new(), |p| p.display().to_string())
        );
    }
}
