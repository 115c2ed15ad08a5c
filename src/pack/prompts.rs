//! Prompt shards (`prepare --method prompts`, for online RL): one prompt per row, `prompt_ids`
//! (list<int32>, the conversation up to its last user turn rendered with the generation prompt), the
//! record `id`, and every other column of the input row as a string column (null where a row lacks
//! it), for reward functions. One file per split, `{split}-00000-of-00001.parquet`.

use crate::output::AtomicFile;
use anyhow::{Context, Result};
use arrow_array::builder::{Int32Builder, ListBuilder, StringBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

/// The columns every prompt shard has, before the input's own.
pub const COLUMNS: [&str; 2] = ["id", "prompt_ids"];

#[derive(Debug, Clone, Default, PartialEq)]
pub struct PromptRow {
    pub id: String,
    pub prompt_ids: Vec<i32>,
    /// The input row's other columns, as text.
    pub columns: BTreeMap<String, String>,
}

/// One split's prompts, written when the split is complete (its columns are the union of its rows').
pub struct PromptWriter {
    split: &'static str,
    rows: Vec<PromptRow>,
    pub tokens: u64,
}

impl PromptWriter {
    pub fn new(split: &'static str) -> Self {
        PromptWriter { split, rows: vec![], tokens: 0 }
    }

    pub fn push(&mut self, row: PromptRow) {
        self.tokens += row.prompt_ids.len() as u64;
        self.rows.push(row);
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Writes the split's file into `dir` (none when it is empty); returns the file names and the
    /// input columns kept.
    pub fn finish(self, dir: &Path) -> Result<(Vec<String>, Vec<String>)> {
        let extra: Vec<String> = self
            .rows
            .iter()
            .flat_map(|r| r.columns.keys().cloned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|c| !COLUMNS.contains(&c.as_str()))
            .collect();
        if self.rows.is_empty() {
            return Ok((vec![], extra));
        }
        let mut fields = vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("prompt_ids", DataType::List(Arc::new(Field::new("item", DataType::Int32, true))), false),
        ];
        fields.extend(extra.iter().map(|c| Field::new(c, DataType::Utf8, true)));
        let schema = Arc::new(Schema::new(fields));
        let mut cols: Vec<ArrayRef> = Vec::with_capacity(2 + extra.len());
        let mut ids = StringBuilder::new();
        let mut prompts = ListBuilder::new(Int32Builder::new());
        for r in &self.rows {
            ids.append_value(&r.id);
            prompts.values().append_slice(&r.prompt_ids);
            prompts.append(true);
        }
        cols.push(Arc::new(ids.finish()));
        cols.push(Arc::new(prompts.finish()));
        for c in &extra {
            let mut b = StringBuilder::new();
            for r in &self.rows {
                b.append_option(r.columns.get(c));
            }
            cols.push(Arc::new(b.finish()));
        }
        let name = super::shards::single_shard_file_name(self.split);
        let file = AtomicFile::create(&dir.join(&name))?;
        let mut w = ArrowWriter::try_new(file, schema.clone(), Some(crate::output::parquet_props()))?;
        w.write(&RecordBatch::try_new(schema, cols)?)?;
        w.into_inner()?.commit()?;
        Ok((vec![name], extra))
    }
}

/// Reads the prompts of a prompt shard file.
pub fn read_prompts(path: &Path) -> Result<Vec<PromptRow>> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::Int32Type;
    use arrow_array::Array;
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{}: not a Parquet file", path.display()))?
        .build()?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch?;
        let schema = batch.schema();
        let ids = batch
            .column_by_name("id")
            .with_context(|| format!("{}: no column 'id' (not a prompt shard)", path.display()))?
            .as_string::<i32>()
            .clone();
        let prompts = batch
            .column_by_name("prompt_ids")
            .with_context(|| format!("{}: no column 'prompt_ids' (not a prompt shard)", path.display()))?
            .as_list::<i32>()
            .clone();
        let extra: Vec<(String, arrow_array::StringArray)> = schema
            .fields()
            .iter()
            .filter(|f| !COLUMNS.contains(&f.name().as_str()))
            .filter_map(|f| Some((f.name().clone(), batch.column_by_name(f.name())?.as_string_opt::<i32>()?.clone())))
            .collect();
        for i in 0..batch.num_rows() {
            let columns =
                extra.iter().filter(|(_, a)| a.is_valid(i)).map(|(n, a)| (n.clone(), a.value(i).to_string())).collect();
            out.push(PromptRow {
                id: ids.value(i).to_string(),
                prompt_ids: prompts.value(i).as_primitive::<Int32Type>().values().to_vec(),
                columns,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_round_trip_with_the_union_of_their_columns() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PromptWriter::new("train");
        let row = |id: &str, ids: Vec<i32>, cols: &[(&str, &str)]| PromptRow {
            id: id.into(),
            prompt_ids: ids,
            columns: cols.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        let rows = vec![row("a:1", vec![1, 2, 3], &[("answer", "4")]), row("a:2", vec![5], &[("level", "hard")])];
        for r in &rows {
            w.push(r.clone());
        }
        let (files, extra) = w.finish(dir.path()).unwrap();
        assert_eq!(extra, vec!["answer", "level"]);
        assert_eq!(read_prompts(&dir.path().join(&files[0])).unwrap(), rows);
    }
}
