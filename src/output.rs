//! Output files that appear only when complete: written to a temporary name beside the target
//! and renamed on `commit`. Dropping an uncommitted file removes the temporary.

use anyhow::{Context, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub struct AtomicFile {
    target: PathBuf,
    tmp: PathBuf,
    writer: Option<BufWriter<File>>,
}

/// `dir/.name.tmp-PID`: hidden, and clearly not a finished output.
pub fn temp_name(target: &Path) -> PathBuf {
    let name = target.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    target.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

impl AtomicFile {
    pub fn create(target: &Path) -> Result<Self> {
        if let Some(dir) = target.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create directory {}", dir.display()))?;
        }
        let tmp = temp_name(target);
        let file = File::create(&tmp)
            .with_context(|| format!("cannot create {} (for {})", tmp.display(), target.display()))?;
        Ok(AtomicFile { target: target.to_path_buf(), tmp, writer: Some(BufWriter::with_capacity(1 << 20, file)) })
    }
    pub fn path(&self) -> &Path {
        &self.target
    }
    pub fn commit(mut self) -> Result<()> {
        let mut w = self.writer.take().expect("writer present until commit");
        w.flush().with_context(|| format!("cannot write {}", self.tmp.display()))?;
        drop(w);
        std::fs::rename(&self.tmp, &self.target)
            .with_context(|| format!("cannot rename {} to {}", self.tmp.display(), self.target.display()))
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.writer.as_mut().expect("open").write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.writer.as_mut().expect("open").write_all(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.writer.as_mut().expect("open").flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.writer.is_some() {
            self.writer = None;
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// The Parquet writer settings of every file tunekit writes: zstd level 3, created by tunekit.
pub fn parquet_props() -> parquet::file::properties::WriterProperties {
    use parquet::basic::{Compression, ZstdLevel};
    parquet::file::properties::WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).expect("valid level")))
        .set_created_by(format!("tunekit {}", crate::VERSION))
        .build()
}
