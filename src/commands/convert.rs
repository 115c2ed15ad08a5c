//! `tunekit convert`: raw files to canonical conversations (JSONL or Parquet), with rejects.

use super::Summary;
use crate::accounting::{Counts, SideFile, SideFiles, Tally};
use crate::ingest::{stream_conversations, Item, MapOptions};
use crate::record::sink::ConversationSink;
use anyhow::{bail, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

pub struct ConvertOptions {
    pub inputs: Vec<PathBuf>,
    pub out: PathBuf,
    pub map: MapOptions,
    pub strict: bool,
}

#[derive(Debug, Serialize)]
pub struct ConvertSummary {
    pub command: &'static str,
    pub inputs: Vec<String>,
    pub out: String,
    pub formats: BTreeMap<String, String>,
    #[serde(flatten)]
    pub tally: Tally,
}

pub fn run(opts: &ConvertOptions) -> Result<ConvertSummary> {
    let start = Instant::now();
    let mut sink = ConversationSink::create(&opts.out)?;
    let mut rejects = SideFile::beside(&opts.out, "rejects.jsonl");
    let mut contaminated = SideFile::beside(&opts.out, "contaminated.jsonl");
    let mut counts = Counts::default();
    let mut formats = BTreeMap::new();
    let pb = crate::progress::rows("convert");
    stream_conversations(&opts.inputs, &opts.map, |batch| {
        if let Some(f) = &batch.label {
            let f = match &batch.read_notes {
                Some(n) => format!("{f}; {n}"),
                None => f.clone(),
            };
            formats.insert(batch.source.to_string(), f);
        }
        let mut good = Vec::with_capacity(batch.items.len());
        for item in batch.items {
            counts.rows_read += 1;
            match item {
                Item::Ok(c) => good.push(c),
                Item::Filtered => counts.filtered += 1,
                Item::Contaminated(c) => {
                    counts.contaminated += 1;
                    contaminated.write(&c)?;
                }
                Item::Rejected(r) => {
                    if opts.strict {
                        bail!("{r}\n(--strict stops at the first bad row; without it, bad rows go to rejects.jsonl)");
                    }
                    counts.reject(&r);
                    rejects.write(&r)?;
                }
            }
        }
        good.iter().for_each(|c| counts.keep(&c.id));
        sink.write_batch(&good)?;
        pb.set_position(counts.rows_read);
        Ok(())
    })?;
    pb.finish_and_clear();
    sink.commit()?;
    let files = SideFiles { rejects: rejects.finish()?, duplicates: None, contaminated: contaminated.finish()? };
    let tally = Tally::new(counts, files, start);
    tally.verdict("convert")?;
    Ok(ConvertSummary {
        command: "convert",
        inputs: opts.inputs.iter().map(|p| p.display().to_string()).collect(),
        out: opts.out.display().to_string(),
        formats,
        tally,
    })
}

impl Summary for ConvertSummary {
    fn print_human(&self) {
        println!("converted {} from {} file(s)", self.tally.rate(), self.inputs.len());
        for (src, f) in &self.formats {
            println!("  {src}: format {f}");
        }
        println!("  written:  {} -> {}", self.tally.counts.rows_kept, self.out);
        self.tally.print_human();
    }
}
