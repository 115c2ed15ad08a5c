//! `tunekit convert`: raw files to canonical conversations (JSONL or Parquet), with rejects.

use crate::accounting::{Counts, RejectWriter};
use crate::ingest::{stream_conversations, Item, MapOptions};
use crate::output::AtomicFile;
use crate::record::Conversation;
use anyhow::{bail, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
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
    pub counts: Counts,
    pub rejects_file: Option<String>,
    pub seconds: f64,
    pub rows_per_s: f64,
}

/// Where conversations go: JSONL lines or a Parquet table, chosen by the extension. JSONL is
/// serialised in parallel and written by a background thread, so writing overlaps the next batch.
pub enum ConversationSink {
    Jsonl(BackgroundWriter),
    Parquet(Box<crate::pack::conversations_parquet::ConversationParquet>),
}

/// A file written by its own thread from a bounded queue of buffers. It is renamed into place
/// only on `commit`; dropped without it (an error upstream), the temporary file is removed.
pub struct BackgroundWriter {
    tx: Option<std::sync::mpsc::SyncSender<Option<Vec<u8>>>>,
    handle: Option<std::thread::JoinHandle<Result<()>>>,
}

impl BackgroundWriter {
    pub fn create(out: &Path) -> Result<Self> {
        let mut file = AtomicFile::create(out)?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Option<Vec<u8>>>(8);
        let handle = std::thread::spawn(move || -> Result<()> {
            for msg in rx {
                match msg {
                    Some(buf) => file.write_all(&buf)?,
                    None => return file.commit(),
                }
            }
            Ok(()) // sender dropped without commit: `file` is dropped and removed
        });
        Ok(BackgroundWriter { tx: Some(tx), handle: Some(handle) })
    }
    pub fn send(&mut self, buf: Vec<u8>) -> Result<()> {
        if self.tx.as_ref().expect("open").send(Some(buf)).is_err() {
            // The writer stopped early: report its error.
            drop(self.tx.take());
            if let Some(h) = self.handle.take() {
                h.join().map_err(|_| anyhow::anyhow!("writer thread panicked"))??;
            }
            anyhow::bail!("the output writer stopped");
        }
        Ok(())
    }
    pub fn commit(mut self) -> Result<()> {
        let tx = self.tx.take().expect("open");
        let _ = tx.send(None);
        drop(tx);
        match self.handle.take() {
            Some(h) => h.join().map_err(|_| anyhow::anyhow!("writer thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for BackgroundWriter {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl ConversationSink {
    pub fn create(out: &Path) -> Result<Self> {
        let ext = out.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
        match ext.as_str() {
            "jsonl" | "ndjson" => Ok(ConversationSink::Jsonl(BackgroundWriter::create(out)?)),
            "parquet" => Ok(ConversationSink::Parquet(Box::new(
                crate::pack::conversations_parquet::ConversationParquet::create(out)?,
            ))),
            _ => bail!("--out {}: write conversations to a .jsonl or .parquet file", out.display()),
        }
    }
    pub fn write_batch(&mut self, convs: &[Conversation]) -> Result<()> {
        match self {
            ConversationSink::Jsonl(w) => {
                let chunks: Vec<Vec<u8>> = convs
                    .par_chunks(512)
                    .map(|chunk| {
                        let mut buf = Vec::with_capacity(chunk.len() * 1024);
                        for c in chunk {
                            serde_json::to_writer(&mut buf, c).expect("conversation serializes");
                            buf.push(b'\n');
                        }
                        buf
                    })
                    .collect();
                for c in chunks {
                    w.send(c)?;
                }
                Ok(())
            }
            ConversationSink::Parquet(p) => p.write(convs),
        }
    }
    pub fn commit(self) -> Result<()> {
        match self {
            ConversationSink::Jsonl(f) => f.commit(),
            ConversationSink::Parquet(p) => p.commit(),
        }
    }
}

pub fn run(opts: &ConvertOptions) -> Result<ConvertSummary> {
    let start = Instant::now();
    let mut sink = ConversationSink::create(&opts.out)?;
    let mut rejects = RejectWriter::beside(&opts.out);
    let mut counts = Counts::default();
    let mut formats = BTreeMap::new();
    let pb = crate::progress::rows("convert");
    stream_conversations(&opts.inputs, &opts.map, |batch| {
        if let Some(f) = batch.format {
            formats.insert(batch.source.to_string(), f.name().to_string());
        }
        let mut good = Vec::with_capacity(batch.items.len());
        for item in batch.items {
            counts.rows_read += 1;
            match item {
                Item::Ok(c) => good.push(c),
                Item::Rejected(r) => {
                    if opts.strict {
                        bail!("{r}\n(--strict stops at the first bad row; without it, bad rows go to rejects.jsonl)");
                    }
                    counts.reject(&r);
                    rejects.write(&r)?;
                }
            }
        }
        counts.rows_kept += good.len() as u64;
        sink.write_batch(&good)?;
        pb.set_position(counts.rows_read);
        Ok(())
    })?;
    pb.finish_and_clear();
    sink.commit()?;
    let rejects_file = rejects.finish()?.map(|p| p.display().to_string());
    let seconds = start.elapsed().as_secs_f64();
    Ok(ConvertSummary {
        command: "convert",
        inputs: opts.inputs.iter().map(|p| p.display().to_string()).collect(),
        out: opts.out.display().to_string(),
        formats,
        rows_per_s: counts.rows_read as f64 / seconds.max(1e-9),
        counts,
        rejects_file,
        seconds,
    })
}

impl ConvertSummary {
    pub fn print_human(&self) {
        println!(
            "converted {} row(s) from {} file(s) in {:.2}s ({:.0} rows/s)",
            self.counts.rows_read,
            self.inputs.len(),
            self.seconds,
            self.rows_per_s
        );
        for (src, f) in &self.formats {
            println!("  {src}: format {f}");
        }
        println!("  written:  {} -> {}", self.counts.rows_kept, self.out);
        println!("  rejected: {}", self.counts.rejected);
        for (r, n) in &self.counts.rejected_by_reason {
            println!("    {r}: {n}");
        }
        if let Some(f) = &self.rejects_file {
            println!("  rejects:  {f}");
        }
    }
}
