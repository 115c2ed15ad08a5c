//! Where conversations are written: JSONL lines or a Parquet table, chosen by the output's extension.
//! JSONL is serialised in parallel and written by a background thread, so writing overlaps the next
//! batch. Both appear under their name only when complete.

use super::Conversation;
use crate::output::AtomicFile;
use anyhow::{bail, Result};
use rayon::prelude::*;
use std::io::Write;
use std::path::Path;

/// Where conversations go: JSONL lines or a Parquet table, chosen by the extension. JSONL is
/// serialised in parallel and written by a background thread, so writing overlaps the next batch.
pub enum ConversationSink {
    Jsonl(BackgroundWriter),
    Parquet(Box<super::table::ConversationParquet>),
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
            "parquet" => Ok(ConversationSink::Parquet(Box::new(super::table::ConversationParquet::create(out)?))),
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
