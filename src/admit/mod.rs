//! Admission: the front every stage shares after reading (prepare, dedup, export). It counts each
//! row, writes bad rows to rejects.jsonl (or stops at the first with --strict), rows overlapping an
//! evaluation set to contaminated.jsonl, and drops duplicates, writing each to duplicates.jsonl with the row it duplicates; what comes out is the
//! batch's kept conversations, in order. Later stages report their own rejects through it, so one
//! set of counts and side files covers the whole run. The steps themselves (the [`crate::dedup`]
//! index) live apart from the front that applies them.

use crate::accounting::{Counts, SideFile, SideFiles};
use crate::dedup::{DedupOptions, Deduper, DupKind, DuplicateRecord, Prepared, Verdict};
use crate::ingest::Item;
use crate::output::AtomicFile;
use crate::quality::decontaminate::Contamination;
use crate::record::Conversation;
use anyhow::{bail, Result};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct Front {
    pub counts: Counts,
    rejects: Option<SideFile>,
    contaminated: Option<SideFile>,
    dup_path: PathBuf,
    dups: Option<AtomicFile>,
    write_files: bool,
    strict: bool,
    deduper: Deduper,
    /// Representative id -> rows removed as its duplicates.
    pub clusters: BTreeMap<String, u64>,
}

impl Front {
    /// `dir` receives rejects.jsonl and duplicates.jsonl; `write_files = false` only counts (dry run).
    pub fn new(dir: &Path, dedup: &DedupOptions, strict: bool, write_files: bool) -> Front {
        Front {
            counts: Counts::default(),
            rejects: Some(SideFile::new(dir.join("rejects.jsonl"))),
            contaminated: Some(SideFile::new(dir.join("contaminated.jsonl"))),
            dup_path: dir.join("duplicates.jsonl"),
            dups: None,
            write_files,
            strict,
            deduper: Deduper::new(dedup.clone()),
            clusters: BTreeMap::new(),
        }
    }

    /// Records a reject found after the front (tokenizing, token limits); stops under --strict.
    pub fn reject(&mut self, r: crate::accounting::Reject) -> Result<()> {
        if self.strict {
            bail!("{r}");
        }
        self.counts.reject(&r);
        if self.write_files {
            self.rejects.as_mut().expect("open until finish").write(&r)?;
        }
        Ok(())
    }

    /// Records a row that overlaps an evaluation set.
    pub fn contaminated(&mut self, c: &Contamination) -> Result<()> {
        self.counts.contaminated += 1;
        if self.write_files {
            self.contaminated.as_mut().expect("open until finish").write(c)?;
        }
        Ok(())
    }

    /// Counts a batch, rejects its bad rows, removes duplicates; returns the kept conversations.
    pub fn admit(&mut self, items: Vec<Item>) -> Result<Vec<Conversation>> {
        let prepared: Vec<(Option<Prepared>, ())> = self.prepare(&items).into_iter().map(|p| (p, ())).collect();
        Ok(self.admit_prepared(items, prepared)?.into_iter().map(|(c, ())| c).collect())
    }

    /// What each conversation of a batch needs for its duplicate decision (computed in parallel).
    pub fn prepare(&self, items: &[Item]) -> Vec<Option<Prepared>> {
        self.deduper.prepare_all(&items.iter().filter_map(Item::conversation).collect::<Vec<_>>())
    }

    /// [`Front::admit`] with each conversation's duplicate check already prepared (by a rank of a
    /// sharded run) and a payload carried along: `prepared` holds one entry per `Item::Ok`, in order.
    pub fn admit_prepared<T>(
        &mut self,
        items: Vec<Item>,
        prepared: Vec<(Option<Prepared>, T)>,
    ) -> Result<Vec<(Conversation, T)>> {
        let convs = self.sort(items)?;
        if convs.len() != prepared.len() {
            bail!("internal error: {} conversations but {} prepared duplicate checks", convs.len(), prepared.len());
        }
        let mut kept = Vec::with_capacity(convs.len());
        for (c, (p, payload)) in convs.into_iter().zip(prepared) {
            let Verdict::Duplicate { of, kind, similarity } = self.deduper.decide(&c.id, p) else {
                kept.push((c, payload));
                continue;
            };
            self.duplicate(&c.id, of, kind, similarity)?;
        }
        Ok(kept)
    }

    /// Counts a batch's rows and records the bad ones (rejected, contaminated); returns its
    /// conversations, in order, for a duplicate check.
    pub fn sort(&mut self, items: Vec<Item>) -> Result<Vec<Conversation>> {
        let mut convs = Vec::with_capacity(items.len());
        for item in items {
            self.counts.rows_read += 1;
            match item {
                Item::Ok(c) => convs.push(c),
                Item::Rejected(r) => self.reject(r)?,
                Item::Filtered => self.counts.filtered += 1,
                Item::Contaminated(c) => self.contaminated(&c)?,
            }
        }
        Ok(convs)
    }

    /// Records row `id` as removed, a duplicate of `of` (in duplicates.jsonl and its cluster).
    pub fn duplicate(&mut self, id: &str, of: String, kind: DupKind, similarity: f64) -> Result<()> {
        match kind {
            DupKind::Exact => self.counts.duplicates_exact += 1,
            DupKind::Near => self.counts.duplicates_near += 1,
        }
        if self.write_files {
            if self.dups.is_none() {
                self.dups = Some(AtomicFile::create(&self.dup_path)?);
            }
            let f = self.dups.as_mut().expect("created above");
            serde_json::to_writer(&mut *f, &DuplicateRecord { id, duplicate_of: &of, kind, similarity })?;
            f.write_all(b"\n")?;
        }
        *self.clusters.entry(of).or_default() += 1;
        Ok(())
    }

    /// Commits the side files; returns those that were written.
    pub fn finish(&mut self) -> Result<SideFiles> {
        let side = |f: Option<SideFile>| match f {
            Some(f) if self.write_files => f.finish(),
            _ => Ok(None),
        };
        let rejects = side(self.rejects.take())?;
        let contaminated = side(self.contaminated.take())?;
        let dups = match self.dups.take() {
            Some(f) => {
                f.commit()?;
                Some(self.dup_path.display().to_string())
            }
            None => {
                if self.write_files {
                    let _ = std::fs::remove_file(&self.dup_path);
                }
                None
            }
        };
        Ok(SideFiles { rejects, duplicates: dups, contaminated })
    }
}
