//! A rank's part on disk: `blocks.jsonl.zst` (one [`Block`] per line, in the rank's order) and
//! `part.json`, written last, which makes the part complete: the command and options it ran with
//! (their digest decides whether a rerun may keep it), the manifest every part shares, the sources
//! this rank hashed, and its counts. The parts of a directory are read back merged into the global
//! batch order.

use super::block::Block;
use crate::cluster::launch::{Share, PARTS};
use crate::output::AtomicFile;
use crate::pack::manifest::{Manifest, SourceFile};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

pub const META: &str = "part.json";
pub const BLOCKS: &str = "blocks.jsonl.zst";

/// What the merge needs beyond the manifest to write what one process would have.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub window_tokens: usize,
    pub shard_bytes: usize,
    pub strict: bool,
}

/// `part.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartMeta {
    /// The command that wrote the part ("prepare" or "dedup").
    pub command: String,
    pub rank: usize,
    pub world_size: usize,
    /// A digest of the options and inputs: every part of a directory must have the same.
    pub digest: String,
    pub settings: Settings,
    /// The manifest the merged directory will carry, before its counts and splits (dedup: only its
    /// dedup options).
    pub manifest: Manifest,
    /// dedup: the output file's name in the directory.
    pub output: Option<String>,
    /// The inputs this rank hashed (input i by rank i mod world size), with their place in the list.
    pub sources: Vec<(usize, SourceFile)>,
    pub blocks: u64,
    pub rows: u64,
    /// The size of `blocks.jsonl.zst` when it was committed (absent in parts of older versions): a
    /// rerun redoes a part whose blocks file is not that size.
    #[serde(default)]
    pub blocks_bytes: Option<u64>,
    /// prepare: how the rank tokenized, for the merge to tokenize a row it keeps that the rank set
    /// aside (absent in parts of older versions, which set none aside).
    #[serde(default)]
    pub tokenizing: Option<TokenizingRecord>,
    /// prepare: conversations the rank did not tokenize because they duplicate an earlier row of
    /// its own share.
    #[serde(default)]
    pub set_aside: u64,
}

/// The tokenizer and chat template a rank of a sharded prepare rendered with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenizingRecord {
    /// The tokenizer's absolute path (the manifest keeps the path as it was given).
    pub tokenizer: String,
    /// The chat template's text (its sha256 is the manifest's).
    pub template: String,
}

impl PartMeta {
    /// The part of `share` under `out` when it is complete and was written with `digest`.
    pub fn complete(out: &Path, share: &Share, digest: &str) -> Option<PartMeta> {
        let p = share.dir(out).join(META);
        let meta: PartMeta = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
        let size = std::fs::metadata(share.dir(out).join(BLOCKS)).ok()?.len();
        (meta.digest == digest && meta.blocks_bytes.is_none_or(|b| b == size)).then_some(meta)
    }
}

/// Writes a rank's blocks as they come, on a thread of its own (serialising and compressing a block
/// overlaps reading and hashing the next); [`PartWriter::finish`] adds `part.json`.
pub struct PartWriter {
    dir: PathBuf,
    blocks: Option<std::sync::mpsc::SyncSender<Block>>,
    writer: Option<std::thread::JoinHandle<Result<AtomicFile>>>,
    pub count: u64,
    pub rows: u64,
}

/// zstd's fastest level: most of a part is hashes and token ids, which hardly compress at any level.
const LEVEL: i32 = 1;

impl PartWriter {
    /// A fresh part for `share` under `out` (an earlier, incomplete or outdated one is removed).
    pub fn create(out: &Path, share: &Share) -> Result<PartWriter> {
        let dir = share.dir(out);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(BLOCKS);
        let mut z = zstd::Encoder::new(AtomicFile::create(&path)?, LEVEL)?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Block>(4);
        let writer = std::thread::spawn(move || -> Result<AtomicFile> {
            for b in rx {
                serde_json::to_writer(&mut z, &b)?;
                z.write_all(b"\n").with_context(|| format!("cannot write {}", path.display()))?;
            }
            Ok(z.finish()?)
        });
        Ok(PartWriter { blocks: Some(tx), writer: Some(writer), dir, count: 0, rows: 0 })
    }

    pub fn write(&mut self, b: Block) -> Result<()> {
        self.count += 1;
        self.rows += b.rows.len() as u64;
        if self.blocks.as_ref().is_some_and(|tx| tx.send(b).is_ok()) {
            return Ok(());
        }
        // The writer stopped: its error says why.
        drop(self.blocks.take());
        self.join_writer()?;
        bail!("the writer of {} stopped", self.dir.join(BLOCKS).display())
    }

    fn join_writer(&mut self) -> Result<AtomicFile> {
        let writer = self.writer.take().context("the part writer has already finished")?;
        writer.join().map_err(|_| anyhow::anyhow!("the part writer panicked"))?
    }

    /// Commits the blocks, then `part.json` (the mark of a complete part), with the blocks' size.
    pub fn finish(mut self, meta: &mut PartMeta) -> Result<PathBuf> {
        drop(self.blocks.take());
        self.join_writer()?.commit()?;
        meta.blocks_bytes = Some(std::fs::metadata(self.dir.join(BLOCKS))?.len());
        let mut f = AtomicFile::create(&self.dir.join(META))?;
        f.write_all(serde_json::to_string_pretty(meta)?.as_bytes())?;
        f.commit()?;
        Ok(self.dir)
    }
}

/// The complete parts of `out`, by rank, checked to be one job's: the same world size and digest,
/// every rank present.
pub fn read_parts(out: &Path) -> Result<Vec<PartMeta>> {
    let root = out.join(PARTS);
    let entries = std::fs::read_dir(&root)
        .with_context(|| format!("{}: no parts (run the ranks with --rank/--world-size first)", root.display()))?;
    let (mut metas, mut incomplete) = (vec![], vec![]);
    for e in entries {
        let dir = e?.path();
        match std::fs::read(dir.join(META)) {
            Ok(b) => metas.push(
                serde_json::from_slice::<PartMeta>(&b).with_context(|| format!("{}: not a part", dir.display()))?,
            ),
            Err(_) => incomplete.push(dir.file_name().unwrap_or_default().to_string_lossy().to_string()),
        }
    }
    metas.sort_by_key(|m| m.rank);
    let Some(first) = metas.first().cloned() else {
        bail!("{}: no complete part (incomplete: {})", root.display(), incomplete.join(", "));
    };
    if let Some(m) = metas.iter().find(|m| m.world_size != first.world_size || m.digest != first.digest) {
        bail!(
            "{}: rank {} of {} ran with other inputs or options than rank {} of {}: rerun all ranks with one command",
            root.display(),
            m.rank,
            m.world_size,
            first.rank,
            first.world_size
        );
    }
    let missing: Vec<String> = (0..first.world_size)
        .filter(|r| metas.binary_search_by_key(r, |m| m.rank).is_err())
        .map(|r| r.to_string())
        .collect();
    if !missing.is_empty() {
        bail!(
            "{}: rank(s) {} of {} are missing or incomplete: rerun those tasks (complete parts are kept), then merge",
            root.display(),
            missing.join(", "),
            first.world_size
        );
    }
    Ok(metas)
}

/// The blocks of all parts in the global batch order (batch i is in the part of rank i mod W). Each
/// part is decompressed and parsed on a thread of its own, a few blocks ahead of the caller.
pub fn blocks_in_order(out: &Path, metas: &[PartMeta]) -> Result<impl Iterator<Item = Result<Block>>> {
    let w = metas.len();
    let mut parts = vec![];
    for m in metas {
        let p = Share { rank: m.rank, world_size: m.world_size }.dir(out).join(BLOCKS);
        let f = std::fs::File::open(&p).with_context(|| format!("cannot read {}", p.display()))?;
        let lines = BufReader::new(zstd::Decoder::new(f)?).lines();
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Block>>(2);
        let (path, rank) = (p.clone(), m.rank as u64);
        std::thread::spawn(move || {
            for (k, line) in lines.enumerate() {
                let i = rank + k as u64 * w as u64;
                let b = line
                    .with_context(|| format!("cannot read {} (damaged: rerun rank {rank})", path.display()))
                    .and_then(|l| {
                        serde_json::from_str::<Block>(&l).with_context(|| {
                            format!(
                                "{}: batch {i} is unreadable (remove that part's folder and rerun its rank)",
                                path.display()
                            )
                        })
                    });
                let failed = b.is_err();
                if tx.send(b).is_err() || failed {
                    return; // the merge stopped, or this part did
                }
            }
        });
        parts.push((p, rx));
    }
    let total: u64 = metas.iter().map(|m| m.blocks).sum();
    Ok((0..total).map(move |i| {
        let (path, blocks) = &parts[i as usize % w];
        let b = blocks.recv().map_err(|_| anyhow::anyhow!("{}: ends before batch {i}", path.display()))??;
        if b.index != i {
            bail!("{}: batch {} where batch {i} belongs", path.display(), b.index);
        }
        Ok(b)
    }))
}
