//! `tunekit dedup`: conversations in, deduplicated conversations out, every removal explained
//! in duplicates.jsonl (id, duplicate_of, kind, similarity).

use super::Summary;
use crate::accounting::{Counts, SideFiles, Tally};
use crate::admit::Front;
use crate::commands::parts::{part_digest, PartSummary};
use crate::dedup::longest::{Fate, LongestOfCluster};
use crate::dedup::{DedupOptions, Prepared};
use crate::ingest::{stream_conversations, Item, MapOptions};
use crate::pack::manifest::Manifest;
use crate::parts::block::Block;
use crate::parts::part::{blocks_in_order, PartMeta, PartWriter, Settings};
use crate::record::sink::ConversationSink;
use crate::record::Conversation;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Which row of a cluster stays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Keep {
    /// The first row seen (one streaming pass).
    First,
    /// The longest row of the cluster (ties: the first); reads the input twice.
    Longest,
}

pub struct DedupRunOptions {
    pub inputs: Vec<PathBuf>,
    pub out: PathBuf,
    pub dry_run: bool,
    pub keep: Keep,
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
    pub tally: Tally,
    /// Clusters with at least one removed row: representative id -> number of rows removed.
    pub clusters: usize,
    pub largest_clusters: Vec<(String, u64)>,
    pub options: DedupOptions,
}

/// `--keep longest`: pass 1 finds the clusters and the longest member of each (the dedup stage's
/// [`LongestOfCluster`]); pass 2 reads the input again through the admission front, which counts
/// and records every row, keeps the chosen member and records every other as its duplicate.
fn run_keep_longest(opts: &DedupRunOptions) -> Result<DedupSummary> {
    let start = Instant::now();
    let mut clusters = LongestOfCluster::new(opts.dedup.clone());
    let pb = crate::progress::rows("dedup (pass 1 of 2)");
    let mut seen = 0u64;
    stream_conversations(&opts.inputs, &opts.map, |batch| {
        seen += batch.items.len() as u64;
        let convs: Vec<Conversation> = batch
            .items
            .into_iter()
            .filter_map(|i| match i {
                Item::Ok(c) => Some(c),
                _ => None,
            })
            .collect();
        clusters.observe(&convs);
        pb.set_position(seen);
        Ok(())
    })?;
    pb.finish_and_clear();
    let mut sink = if opts.dry_run { None } else { Some(ConversationSink::create(&opts.out)?) };
    let mut front = Front::new(out_dir(&opts.out), &opts.dedup, opts.strict, !opts.dry_run);
    let pb = crate::progress::rows("dedup (pass 2 of 2)");
    stream_conversations(&opts.inputs, &opts.map, |batch| {
        let mut kept = Vec::new();
        for c in front.sort(batch.items)? {
            match clusters.fate(&c.id).context("internal error: a row pass 1 did not see")? {
                Fate::Keep => kept.push(c),
                Fate::DuplicateOf { of, kind, similarity } => {
                    front.duplicate(&c.id, of.to_string(), kind, similarity)?
                }
            }
        }
        kept.iter().for_each(|c| front.counts.keep(&c.id));
        if let Some(s) = sink.as_mut() {
            s.write_batch(&kept)?;
        }
        pb.set_position(front.counts.rows_read);
        Ok(())
    })?;
    pb.finish_and_clear();
    if let Some(s) = sink {
        s.commit()?;
    }
    let files = front.finish()?;
    let largest: Vec<(String, u64)> = front.clusters.iter().map(|(k, v)| (k.clone(), *v)).collect();
    Ok(summary(opts, front.counts.clone(), largest, files, start))
}

pub fn run(opts: &DedupRunOptions) -> Result<DedupSummary> {
    if opts.keep == Keep::Longest {
        return run_keep_longest(opts);
    }
    keep_first(opts, out_dir(&opts.out), |take| {
        stream_conversations(&opts.inputs, &opts.map, |batch| take(batch.items, None))
    })
}

/// The directory of an output file (its side files and, sharded, its parts go there).
fn out_dir(out: &Path) -> &Path {
    out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Each row in the order `feed` hands the batches over (with their duplicate checks prepared,
/// from a sharded run's parts, or not): counted, checked, the first of each cluster kept.
fn keep_first(
    opts: &DedupRunOptions,
    dir: &Path,
    feed: impl FnOnce(&mut dyn FnMut(Vec<Item>, Option<Vec<Option<Prepared>>>) -> Result<()>) -> Result<()>,
) -> Result<DedupSummary> {
    let start = Instant::now();
    let mut sink = if opts.dry_run { None } else { Some(ConversationSink::create(&opts.out)?) };
    let mut front = Front::new(dir, &opts.dedup, opts.strict, !opts.dry_run);
    let pb = crate::progress::rows("dedup");
    feed(&mut |items, prepared| {
        let kept: Vec<Conversation> = match prepared {
            None => front.admit(items)?,
            Some(p) => {
                let p = p.into_iter().map(|p| (p, ())).collect();
                front.admit_prepared(items, p)?.into_iter().map(|(c, ())| c).collect()
            }
        };
        kept.iter().for_each(|c| front.counts.keep(&c.id));
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
    let files = front.finish()?;
    let largest: Vec<(String, u64)> = front.clusters.iter().map(|(k, v)| (k.clone(), *v)).collect();
    Ok(summary(opts, front.counts.clone(), largest, files, start))
}

/// A rank's share of a sharded dedup: its batches read, checked and signed into its part under
/// the output's directory, for `merge-parts` to decide in input order.
pub fn run_part(opts: &DedupRunOptions) -> Result<PartSummary> {
    let share = opts.map.share.context("a part needs --rank and --world-size")?;
    if opts.keep == Keep::Longest || opts.dry_run || opts.map.select.is_active() {
        bail!("a sharded dedup keeps the first row of each cluster and writes its output: no --keep longest, --dry-run, --sql, --limit or --sample");
    }
    let start = Instant::now();
    let root = out_dir(&opts.out);
    let digest = part_digest(&opts.inputs)?;
    if let Some(meta) = PartMeta::complete(root, &share, &digest) {
        return Ok(PartSummary::of(root, &meta, true, start));
    }
    let front = Front::new(root, &opts.dedup, opts.strict, false);
    let mut part = PartWriter::create(root, &share)?;
    let pb = crate::progress::rows("dedup (part)");
    stream_conversations(&opts.inputs, &opts.map, |batch| {
        let prepared = front.prepare(&batch.items);
        part.write(Block::new(batch.index, batch.items, prepared.into_iter().map(|p| (p, None)).collect()))?;
        pb.set_position(part.rows);
        Ok(())
    })?;
    pb.finish_and_clear();
    let mut meta = PartMeta {
        command: "dedup".into(),
        rank: share.rank,
        world_size: share.world_size,
        digest,
        settings: Settings { window_tokens: 0, shard_bytes: 0, strict: opts.strict },
        manifest: Manifest { dedup: opts.dedup.clone(), ..Default::default() },
        output: Some(opts.out.file_name().unwrap_or_default().to_string_lossy().to_string()),
        sources: vec![],
        blocks: part.count,
        rows: part.rows,
        blocks_bytes: None,
        tokenizing: None,
        set_aside: 0,
    };
    part.finish(&mut meta)?;
    Ok(PartSummary::of(root, &meta, false, start))
}

/// `merge-parts` of a sharded dedup: the parts under `dir` decided in input order into the output
/// file and side files one process would have written.
pub fn merge(dir: &Path, metas: Vec<PartMeta>) -> Result<DedupSummary> {
    let first = &metas[0];
    let name = first.output.clone().context("a dedup part without its output name")?;
    let opts = DedupRunOptions {
        inputs: vec![],
        out: dir.join(name),
        dry_run: false,
        keep: Keep::First,
        map: MapOptions::default(),
        strict: first.settings.strict,
        dedup: first.manifest.dedup.clone(),
    };
    let blocks = blocks_in_order(dir, &metas)?;
    keep_first(&opts, dir, |take| {
        for b in blocks {
            let (items, extra) = b?.into_items();
            take(items, Some(extra.into_iter().map(|e| e.0).collect()))?;
        }
        Ok(())
    })
}

/// The summary of a run; `clusters` lists every cluster with a removed row (representative, rows removed).
fn summary(
    opts: &DedupRunOptions,
    counts: Counts,
    mut clusters: Vec<(String, u64)>,
    files: SideFiles,
    start: Instant,
) -> DedupSummary {
    let n = clusters.len();
    clusters.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    clusters.truncate(10);
    DedupSummary {
        command: "dedup",
        out: (!opts.dry_run).then(|| opts.out.display().to_string()),
        dry_run: opts.dry_run,
        tally: Tally::new(counts, files, start),
        clusters: n,
        largest_clusters: clusters,
        options: opts.dedup.clone(),
    }
}

impl Summary for DedupSummary {
    fn print_human(&self) {
        let c = &self.tally.counts;
        println!("deduplicated {}{}", self.tally.rate(), if self.dry_run { " [dry run]" } else { "" });
        println!("  kept:       {}", c.rows_kept);
        println!(
            "  duplicates: {} exact, {} near, in {} cluster(s)",
            c.duplicates_exact, c.duplicates_near, self.clusters
        );
        for (id, n) in self.largest_clusters.iter().take(5) {
            println!("    {id}: {n} removed");
        }
        if let Some(o) = &self.out {
            println!("  output:     {o}");
        }
        self.tally.print_human();
    }
}
