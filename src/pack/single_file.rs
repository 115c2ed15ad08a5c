//! One split in a single `{split}-00000-of-00001.parquet` (preference pairs, labelled KTO rows: few
//! next to SFT rows): rows written in batches as they come, the file committed whole at the end; and
//! the pieces their readers share.

use crate::output::AtomicFile;
use anyhow::{Context, Result};
use arrow_array::builder::{Int32Builder, ListBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::Schema;
use parquet::arrow::ArrowWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Rows buffered before a record batch is written.
const BATCH: usize = 512;

pub struct SingleFile<R> {
    dir: PathBuf,
    split: &'static str,
    schema: Arc<Schema>,
    /// The columns of a batch of rows, in the schema's order.
    columns: fn(&[R]) -> Vec<ArrayRef>,
    writer: Option<ArrowWriter<AtomicFile>>,
    pending: Vec<R>,
}

impl<R> SingleFile<R> {
    pub fn new(dir: &Path, split: &'static str, schema: Arc<Schema>, columns: fn(&[R]) -> Vec<ArrayRef>) -> Self {
        SingleFile { dir: dir.to_path_buf(), split, schema, columns, writer: None, pending: Vec::new() }
    }

    pub fn push(&mut self, r: R) -> Result<()> {
        self.pending.push(r);
        if self.pending.len() >= BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if self.writer.is_none() {
            let f = AtomicFile::create(&self.dir.join(super::shards::single_shard_file_name(self.split)))?;
            self.writer = Some(ArrowWriter::try_new(f, self.schema.clone(), Some(crate::output::parquet_props()))?);
        }
        let rows = std::mem::take(&mut self.pending);
        let batch = RecordBatch::try_new(self.schema.clone(), (self.columns)(&rows))?;
        self.writer.as_mut().expect("opened").write(&batch)?;
        Ok(())
    }

    /// Writes what is left and commits the file; its name, or none when the split had no rows.
    pub fn finish(mut self) -> Result<Vec<String>> {
        self.flush()?;
        match self.writer.take() {
            Some(w) => {
                w.into_inner()?.commit()?;
                Ok(vec![super::shards::single_shard_file_name(self.split)])
            }
            None => Ok(vec![]),
        }
    }
}

/// A list<int32> column of one field of each row.
pub fn int_lists<R>(rows: &[R], get: impl Fn(&R) -> &[i32]) -> ArrayRef {
    let mut b = ListBuilder::new(Int32Builder::new());
    for r in rows {
        b.values().append_slice(get(r));
        b.append(true);
    }
    Arc::new(b.finish())
}

/// The record batches of a file and a getter of their columns by name that errors naming the file and
/// the shard kind (`what`) it is not.
pub fn read_batches(path: &Path) -> Result<Vec<RecordBatch>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)?.build()?;
    Ok(reader.collect::<std::result::Result<Vec<_>, _>>()?)
}

/// A batch's column `name`, or an error saying the file is not a `what`.
pub fn column<'a>(batch: &'a RecordBatch, name: &str, path: &Path, what: &str) -> Result<&'a ArrayRef> {
    batch.column_by_name(name).with_context(|| format!("{}: no column '{name}' (not a {what})", path.display()))
}

/// Row `i` of a list<int32> column.
pub fn int_list(a: &arrow_array::ListArray, i: usize) -> Vec<i32> {
    use arrow_array::cast::AsArray;
    a.value(i).as_primitive::<arrow_array::types::Int32Type>().values().to_vec()
}
