//! Outputs that appear only when complete, and one writer at a time: an [`AtomicFile`] is written
//! to a temporary name beside the target and renamed on `commit` (dropping an uncommitted file
//! removes the temporary); a [`DirLock`] keeps a second command from writing the same directory.

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

/// The file in an output directory that says who is writing it.
pub const LOCK_FILE: &str = ".tunekit.lock";

/// An exclusive lock on an output directory while one command writes it: a second command that
/// would write the same directory stops with an error that names the holder, instead of both
/// finishing and one silently winning. The lock is the kernel's (`flock`), so a holder that dies
/// leaves no stale lock; the file naming the holder is removed when the holder finishes.
pub struct DirLock {
    path: PathBuf,
    _file: File,
}

impl DirLock {
    /// Locks `dir` (made if missing) for `command` (as the error will name it: "tunekit prepare").
    pub fn acquire(dir: &Path, command: &str) -> Result<DirLock> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(LOCK_FILE);
        loop {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            if !try_lock(&file)? {
                let mut holder = String::new();
                let _ = std::io::Read::read_to_string(&mut file, &mut holder);
                let holder = holder.trim();
                let holder = if holder.is_empty() { "another tunekit process" } else { holder };
                anyhow::bail!(
                    "{} is being written by {holder}; wait for it to finish, or write to another directory",
                    dir.display()
                );
            }
            // A holder that just finished removed the file we opened: lock the one at the path now.
            if !same_file(&file, &path) {
                continue;
            }
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            let since = chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC");
            let who = format!("{command} (pid {} on {}, since {since})\n", std::process::id(), host.trim());
            file.set_len(0)?;
            file.write_all(who.as_bytes())?;
            file.flush()?;
            return Ok(DirLock { path, _file: file });
        }
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        // Removed while still locked; the lock goes with the file handle right after.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Takes the exclusive lock on `file` without waiting: false when another process holds it.
fn try_lock(file: &File) -> Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file descriptor this process owns; it touches no memory.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(false),
        _ => Err(e).context("cannot lock the output directory"),
    }
}

/// Whether the open `file` is the file at `path` (same device and inode).
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_writer_is_refused_and_named_until_the_first_finishes() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path(), "tunekit prepare").unwrap();
        // flock locks belong to the open file: a second open in this process conflicts as another process would.
        let err = DirLock::acquire(dir.path(), "tunekit prepare").err().unwrap().to_string();
        assert!(err.contains("is being written by tunekit prepare (pid"), "{err}");
        assert!(err.contains(&std::process::id().to_string()), "{err}");
        drop(first);
        assert!(!dir.path().join(LOCK_FILE).exists(), "the holder's file goes with it");
        let again = DirLock::acquire(dir.path(), "tunekit train").unwrap();
        drop(again);
    }
}
