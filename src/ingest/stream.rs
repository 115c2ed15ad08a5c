//! Files to batches of conversations: a reader thread splits rows, rayon parses and maps them,
//! and the caller receives batches in input order (so output order and ids are deterministic).

use super::formats::Mapper;
use super::item::{Batch, Item, BATCH_ROWS};
use super::options::MapOptions;
use super::read::{open_rows, InputKind, Source};
use super::rows::to_object;
use crate::accounting::{Reject, RowCtx};
use anyhow::Result;
use rayon::prelude::*;
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::sync::mpsc::sync_channel;

/// A parsed row: record number, line, and the object or why it could not be read.
type Parsed = (u64, Option<u64>, Result<Map<String, Value>, Reject>);

/// Reads every input in order and calls `on_batch` with mapped rows. Fatal errors (unreadable
/// file, no format fits) stop the stream; bad rows become `Item::Rejected`.
pub fn stream_conversations(
    inputs: &[PathBuf],
    opts: &MapOptions,
    mut on_batch: impl FnMut(Batch) -> Result<()>,
) -> Result<()> {
    if opts.select.is_active() {
        return super::table::select_conversations(inputs, opts, &opts.select, &mut on_batch);
    }
    let mut index = 0u64;
    for path in inputs {
        let (source, rows) = open_rows(path, &opts.read)?;
        let read_notes = read_notes(&source);
        let (tx, rx) = sync_channel::<Result<Vec<super::read::RawRow>>>(4);
        let reader = std::thread::spawn(move || {
            let mut rows = rows;
            loop {
                let mut batch = Vec::with_capacity(BATCH_ROWS);
                for r in rows.by_ref() {
                    match r {
                        Ok(r) => batch.push(r),
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                    if batch.len() == BATCH_ROWS {
                        break;
                    }
                }
                let last = batch.len() < BATCH_ROWS;
                if !batch.is_empty() && tx.send(Ok(batch)).is_err() {
                    return;
                }
                if last {
                    return;
                }
            }
        });
        let mut mapper: Option<Mapper> = None;
        let result = (|| -> Result<()> {
            for raw in rx {
                let raw = raw?;
                let here = index;
                index += 1;
                // A rank of a sharded run maps only its own batches (and reads a file's columns
                // from its first rows, as every rank and the single process do).
                let mine = opts.share.is_none_or(|s| here % s.world_size as u64 == s.rank as u64);
                if !mine && mapper.is_some() {
                    continue;
                }
                let parsed: Vec<Parsed> = raw.into_par_iter().map(|r| (r.row, r.line, to_object(&source, r))).collect();
                if mapper.is_none() {
                    if let Some(cols) = first_columns(&source, &parsed) {
                        mapper = Some(Mapper::new(opts, &cols, &source.name)?);
                    }
                }
                if !mine {
                    continue;
                }
                let items: Vec<Item> = parsed
                    .into_par_iter()
                    .map(|(row, line, obj)| match obj {
                        Err(r) => Item::Rejected(r),
                        Ok(obj) => {
                            let ctx = RowCtx { source: &source.name, row, line };
                            Item::mapped(mapper.as_ref().expect("built at the first parsed row"), opts, obj, &ctx)
                        }
                    })
                    .collect();
                on_batch(Batch {
                    index: here,
                    source: source.name.clone(),
                    format: mapper.as_ref().map(|m| m.format),
                    label: mapper.as_ref().map(Mapper::label),
                    read_notes: read_notes.clone(),
                    items,
                })?;
            }
            Ok(())
        })();
        let _ = reader.join();
        result?;
    }
    Ok(())
}

/// What a summary should say about how a file was read, when it was not the default.
fn read_notes(source: &Source) -> Option<String> {
    let mut notes = vec![];
    let default = if source.kind == InputKind::Tsv { b'\t' } else { b',' };
    if let Some(d) = source.delimiter.filter(|&d| d != default) {
        notes.push(format!("delimiter {}", super::read::delimiter_name(d)));
    }
    if let Some(e) = source.encoding {
        notes.push(format!("encoding {}", e.name()));
    }
    (!notes.is_empty()).then(|| notes.join(", "))
}

fn first_columns(source: &Source, parsed: &[Parsed]) -> Option<Vec<String>> {
    if matches!(source.kind, InputKind::Csv | InputKind::Tsv | InputKind::Spreadsheet) {
        return source.csv_headers.as_ref().map(|h| h.as_ref().clone());
    }
    parsed.iter().find_map(|(_, _, o)| {
        o.as_ref().ok().map(|m| m.iter().filter(|(_, v)| !v.is_null()).map(|(k, _)| k.clone()).collect())
    })
}
