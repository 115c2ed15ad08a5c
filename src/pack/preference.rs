//! Preference shards (`prepare --method preference`): one pair per row, never split or packed:
//! `chosen_input_ids`, `chosen_labels`, `rejected_input_ids`, `rejected_labels` (list<int32>), each side
//! the shared prompt plus one answer rendered with the chat template, labels only on the answer.

use super::single_file::{column, int_list, int_lists, read_batches, SingleFile};
use anyhow::Result;
use arrow_array::ArrayRef;
use arrow_schema::{DataType, Field, Schema};
use std::path::Path;
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
    file: SingleFile<PreferenceRow>,
    pub pairs: u64,
    pub tokens: u64,
    /// Answer tokens (labels other than -100) of both sides.
    pub trained: u64,
}

fn columns(rows: &[PreferenceRow]) -> Vec<ArrayRef> {
    vec![
        int_lists(rows, |r| &r.chosen_input_ids),
        int_lists(rows, |r| &r.chosen_labels),
        int_lists(rows, |r| &r.rejected_input_ids),
        int_lists(rows, |r| &r.rejected_labels),
    ]
}

impl PreferenceWriter {
    pub fn new(dir: &Path, split: &'static str) -> Self {
        PreferenceWriter { file: SingleFile::new(dir, split, schema(), columns), pairs: 0, tokens: 0, trained: 0 }
    }

    pub fn write(&mut self, rows: Vec<PreferenceRow>) -> Result<()> {
        for r in rows {
            self.pairs += 1;
            self.tokens += (r.chosen_input_ids.len() + r.rejected_input_ids.len()) as u64;
            self.trained += r.chosen_labels.iter().chain(&r.rejected_labels).filter(|&&l| l != -100).count() as u64;
            self.file.push(r)?;
        }
        Ok(())
    }

    pub fn finish(self) -> Result<Vec<String>> {
        self.file.finish()
    }
}

/// Reads the pairs of a preference shard file.
pub fn read_pairs(path: &Path) -> Result<Vec<PreferenceRow>> {
    use arrow_array::cast::AsArray;
    let mut out = Vec::new();
    for batch in read_batches(path)? {
        let get = |n: &str| -> Result<arrow_array::ListArray> {
            Ok(column(&batch, n, path, "preference shard")?.as_list::<i32>().clone())
        };
        let c = [get(COLUMNS[0])?, get(COLUMNS[1])?, get(COLUMNS[2])?, get(COLUMNS[3])?];
        for i in 0..batch.num_rows() {
            out.push(PreferenceRow {
                chosen_input_ids: int_list(&c[0], i),
                chosen_labels: int_list(&c[1], i),
                rejected_input_ids: int_list(&c[2], i),
                rejected_labels: int_list(&c[3], i),
            });
        }
    }
    Ok(out)
}
