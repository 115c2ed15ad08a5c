//! Preference shards (`prepare --method preference`): one pair per row, never split or packed:
//! `chosen_input_ids`, `chosen_labels`, `rejected_input_ids`, `rejected_labels` (list<int32>), each side
//! the shared prompt plus one answer rendered with the chat template, labels only on the answer.

use crate::output::AtomicFile;
use anyhow::{Context, Result};
use arrow_array::builder::{Int32Builder, ListBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const COLUMNS: [&str; 4] = ["chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"];

#[derive(Debug, Clone, Default, PartialEq)]
pub struct PreferenceRow {
    pub chosen_input_ids: Vec<i32>,
    pub chosen_labels: Vec<i32>,
    pub rejected_input_ids: Vec<i32>,
    pub rejected_labels: Vec<i32>,
}

pub fn schema() -> Arc<Schema> {
    let list = || DataType::List(Arc::new(Field::new("item", DataType::Int32, true)));
    Arc::new(Schema::new(COLUMNS.iter().map(|c| Field::new(*c, list(), false)).collect::<Vec<_>>()))
}

/// Writes one split as a single `{split}-00000-of-00001.parquet` (pairs are few next to SFT rows).
pub struct PreferenceWriter {
    dir: PathBuf,
    split: &'static str,
    writer: Option<ArrowWriter<AtomicFile>>,
    pending: Vec<PreferenceRow>,
    pub pairs: u64,
    pub tokens: u64,
    /// Answer tokens (labels other than -100) of both sides.
    pub trained: u64,
}

impl PreferenceWriter {
    pub fn new(dir: &Path, split: &'static str) -> Self {
        PreferenceWriter {
            dir: dir.to_path_buf(),
            split,
            writer: None,
            pending: Vec::new(),
            pairs: 0,
            tokens: 0,
            trained: 0,
        }
    }

    pub fn write(&mut self, rows: Vec<PreferenceRow>) -> Result<()> {
        for r in rows {
            self.pairs += 1;
            self.tokens += (r.chosen_input_ids.len() + r.rejected_input_ids.len()) as u64;
            self.trained += r.chosen_labels.iter().chain(&r.rejected_labels).filter(|&&l| l != -100).count() as u64;
            self.pending.push(r);
        }
        if self.pending.len() >= 512 {
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
            self.writer = Some(ArrowWriter::try_new(f, schema(), Some(crate::output::parquet_props()))?);
        }
        let rows = std::mem::take(&mut self.pending);
        let col = |get: &dyn Fn(&PreferenceRow) -> &[i32]| -> ArrayRef {
            let mut b = ListBuilder::new(Int32Builder::new());
            for r in &rows {
                b.values().append_slice(get(r));
                b.append(true);
            }
            Arc::new(b.finish())
        };
        let cols = vec![
            col(&|r| &r.chosen_input_ids),
            col(&|r| &r.chosen_labels),
            col(&|r| &r.rejected_input_ids),
            col(&|r| &r.rejected_labels),
        ];
        self.writer.as_mut().expect("opened").write(&RecordBatch::try_new(schema(), cols)?)?;
        Ok(())
    }

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

/// Reads the pairs of a preference shard file.
pub fn read_pairs(path: &Path) -> Result<Vec<PreferenceRow>> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::Int32Type;
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)?.build()?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch?;
        let get = |n: &str| -> Result<arrow_array::ListArray> {
            Ok(batch
                .column_by_name(n)
                .with_context(|| format!("{}: no column '{n}' (not a preference shard)", path.display()))?
                .as_list::<i32>()
                .clone())
        };
        let c = [get(COLUMNS[0])?, get(COLUMNS[1])?, get(COLUMNS[2])?, get(COLUMNS[3])?];
        for i in 0..batch.num_rows() {
            let v = |a: &arrow_array::ListArray| a.value(i).as_primitive::<Int32Type>().values().to_vec();
            out.push(PreferenceRow {
                chosen_input_ids: v(&c[0]),
                chosen_labels: v(&c[1]),
                rejected_input_ids: v(&c[2]),
                rejected_labels: v(&c[3]),
            });
        }
    }
    Ok(out)
}
