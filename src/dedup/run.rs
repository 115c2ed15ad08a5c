//! `tunekit dedup`: conversations in, deduplicated conversations out, every removal explained
//! in duplicates.jsonl (id, duplicate_of, kind, similarity).

use super::front::Front;
use super::DedupOptions;
use crate::accounting::Counts;
use crate::convert::ConversationSink;
use crate::ingest::{stream_conversations, MapOptions};
use anyhow::Result;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

pub struct DedupRunOptions {
    pub inputs: Vec<PathBuf>,
    pub out: PathBuf,
    pub dry_run: bool,
    pub map: MapOptions,
    pub strict: bool,
    pub dedup: DedupOptions,
}

#[derive(Debug, Serialize)]
pub struct DedupSummary {
    pub command: &'static str,
    pub out: Option<String>,
    pub dry_run: bool,
    #[serde(flatten)]
    pub counts: Counts,
    /// Clusters with at least one removed row: representative id -> number of rows removed.
    pub clusters: usize,
    pub largest_clusters: Vec<(String, u64)>,
    pub duplicates_file: Option<String>,
    pub rejects_file: Option<String>,
    pub options: DedupOptions,
    pub seconds: f64,
    pub rows_per_s: f64,
}

pub fn run(opts: &DedupRunOptions) -> Result<DedupSummary> {
    let start = Instant::now();
    let mut sink = if opts.dry_run { None } else { Some(ConversationSink::create(&opts.out)?) };
    let dir = opts.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let mut front = Front::new(dir, &opts.dedup, opts.strict, !opts.dry_run);
    let pb = crate::progress::rows("dedup");
    stream_conversations(&opts.inputs, &opts.map, |batch| {
        let kept = front.admit(batch.items)?;
        front.counts.rows_kept += kept.len() as u64;
        if let Some(s) = sink.as_mut() {
            s.write_batch(&kept)?;
        }
        pb.set_position(front.counts.rows_read);
        Ok(())
    })?;
    pb.finish_and_clear();
    if front.counts.rows_read == 0 {
        crate::progress::warn("the input has no rows; the output is empty");
    }
    if let Some(s) = sink {
        s.commit()?;
    }
    let (rejects_file, duplicates_file) = front.finish()?;
    let mut largest: Vec<(String, u64)> = front.clusters.iter().map(|(k, v)| (k.clone(), *v)).collect();
    largest.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    largest.truncate(10);
    let seconds = start.elapsed().as_secs_f64();
    let counts = front.counts.clone();
    Ok(DedupSummary {
        command: "dedup",
        out: (!opts.dry_run).then(|| opts.out.display().to_string()),
        dry_run: opts.dry_run,
        rows_per_s: counts.rows_read as f64 / seconds.max(1e-9),
        counts,
        clusters: front.clusters.len(),
        largest_clusters: largest,
        duplicates_file,
        rejects_file,
        options: opts.dedup.clone(),
        seconds,
    })
}

impl DedupSummary {
    pub fn print_human(&self) {
        let c = &self.counts;
        println!(
            "deduplicated {} row(s) in {:.2}s ({:.0} rows/s){}",
            c.rows_read,
            self.seconds,
            self.rows_per_s,
            if self.dry_run { " [dry run]" } else { "" }
        );
        println!("  kept:       {}", c.rows_kept);
        println!(
            "  duplicates: {} exact, {} near, in {} cluster(s)",
            c.duplicates_exact, c.duplicates_near, self.clusters
        );
        for (id, n) in self.largest_clusters.iter().take(5) {
            println!("    {id}: {n} removed");
        }
        println!("  rejected:   {}", c.rejected);
        if let Some(o) = &self.out {
            println!("  output:     {o}");
        }
        if let Some(f) = &self.duplicates_file {
            println!("  duplicates: {f}");
        }
        if let Some(f) = &self.rejects_file {
            println!("  rejects:    {f}");
        }
    }
}
