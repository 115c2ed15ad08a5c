//! Unpaired preference shards (`prepare --method kto`): one labelled conversation per row, never
//! packed: `input_ids`, `labels` (list<int32>; labels only on the final answer, where the
//! completion starts) and `label` (bool: the answer is desirable). One file per split,
//! `{split}-00000-of-00001.parquet`.

use super::single_file::{column, int_list, int_lists, read_batches, SingleFile};
use anyhow::{Context, Result};
use arrow_array::{ArrayRef, BooleanArray};
use arrow_schema::{DataType, Field, Schema};
use std::path::Path;
use std::sync::Arc;

pub const COLUMNS: [&str; 3] = ["input_ids", "labels", "label"];

#[derive(Debug, Clone, Default, PartialEq)]
pub struct UnpairedRow {
    pub input_ids: Vec<i32>,
    pub labels: Vec<i32>,
    /// The answer is desirable (thumbs up).
    pub desirable: bool,
}

impl UnpairedRow {
    /// Where the completion starts: the first trained token (the prompt is everything before it).
    pub fn prompt_len(&self) -> usize {
        self.labels.iter().position(|&l| l != -100).unwrap_or(self.labels.len())
    }
}

pub fn schema() -> Arc<Schema> {
    let list = || DataType::List(Arc::new(Field::new("item", DataType::Int32, true)));
    Arc::new(Schema::new(vec![
        Field::new(COLUMNS[0], list(), false),
        Field::new(COLUMNS[1], list(), false),
        Field::new(COLUMNS[2], DataType::Boolean, false),
    ]))
}

/// Writes one split as a single `{split}-00000-of-00001.parquet`.
pub struct UnpairedWriter {
    file: SingleFile<UnpairedRow>,
    pub rows: u64,
    pub desirable: u64,
    pub tokens: u64,
    /// Answer tokens (labels other than -100).
    pub trained: u64,
}

fn columns(rows: &[UnpairedRow]) -> Vec<ArrayRef> {
    let label = BooleanArray::from(rows.iter().map(|r| r.desirable).collect::<Vec<_>>());
    vec![int_lists(rows, |r| &r.input_ids), int_lists(rows, |r| &r.labels), Arc::new(label)]
}

impl UnpairedWriter {
    pub fn new(dir: &Path, split: &'static str) -> Self {
        let file = SingleFile::new(dir, split, schema(), columns);
        UnpairedWriter { file, rows: 0, desirable: 0, tokens: 0, trained: 0 }
    }

    pub fn write(&mut self, rows: Vec<UnpairedRow>) -> Result<()> {
        for r in rows {
            self.rows += 1;
            self.desirable += r.desirable as u64;
            self.tokens += r.input_ids.len() as u64;
            self.trained += r.labels.iter().filter(|&&l| l != -100).count() as u64;
            self.file.push(r)?;
        }
        Ok(())
    }

    pub fn finish(self) -> Result<Vec<String>> {
        self.file.finish()
    }
}

/// Reads the rows of an unpaired shard file.
pub fn read_unpaired(path: &Path) -> Result<Vec<UnpairedRow>> {
    use arrow_array::cast::AsArray;
    let what = "KTO shard";
    let mut out = Vec::new();
    for batch in read_batches(path)? {
        let ids = column(&batch, COLUMNS[0], path, what)?.as_list::<i32>();
        let labels = column(&batch, COLUMNS[1], path, what)?.as_list::<i32>();
        let label = column(&batch, COLUMNS[2], path, what)?
            .as_boolean_opt()
            .with_context(|| format!("{}: column 'label' is not boolean", path.display()))?;
        for i in 0..batch.num_rows() {
            out.push(UnpairedRow {
                input_ids: int_list(ids, i),
                labels: int_list(labels, i),
                desirable: label.value(i),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_with_their_labels_and_prompt_lengths() {
        let dir = tempfile::tempdir().unwrap();
        let rows = vec![
            UnpairedRow { input_ids: vec![1, 2, 3, 4], labels: vec![-100, -100, 3, 4], desirable: true },
            UnpairedRow { input_ids: vec![5, 6], labels: vec![-100, 6], desirable: false },
        ];
        let mut w = UnpairedWriter::new(dir.path(), "train");
        w.write(rows.clone()).unwrap();
        assert_eq!((w.rows, w.desirable, w.tokens, w.trained), (2, 1, 6, 3));
        let files = w.finish().unwrap();
        let back = read_unpaired(&dir.path().join(&files[0])).unwrap();
        assert_eq!(back, rows);
        assert_eq!((back[0].prompt_len(), back[1].prompt_len()), (2, 1));
    }
}
