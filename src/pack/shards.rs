//! The training shard files of ../shared/DESIGN.md: `train-00000-of-000NN.parquet`, ... with
//! columns input_ids, labels, position_ids, seq_lengths (list<int32>), zstd-compressed. Files are
//! written under temporary names and renamed once the total count is known.

use super::rows::PackedRow;
use crate::output::AtomicFile;
use anyhow::{Context, Result};
use arrow_array::builder::{Int32Builder, ListBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const COLUMNS: [&str; 4] = ["input_ids", "labels", "position_ids", "seq_lengths"];

/// The file name of shard `index` (0-based) of `count` of a split: `train-00000-of-00001.parquet`.
pub fn shard_file_name(split: &str, index: usize, count: usize) -> String {
    format!("{split}-{index:05}-of-{count:05}.parquet")
}

/// The one file of a split written whole (preference pairs, prompts): `eval-00000-of-00001.parquet`.
pub fn single_shard_file_name(split: &str) -> String {
    shard_file_name(split, 0, 1)
}

pub fn schema() -> Arc<Schema> {
    let list = || DataType::List(Arc::new(Field::new("item", DataType::Int32, true)));
    Arc::new(Schema::new(COLUMNS.iter().map(|c| Field::new(*c, list(), false)).collect::<Vec<_>>()))
}

fn props() -> WriterProperties {
    let p = crate::output::parquet_props();
    WriterProperties::builder()
        .set_compression(p.compression(&parquet::schema::types::ColumnPath::from("input_ids")))
        .set_created_by(p.created_by().to_string())
        .set_max_row_group_size(1024)
        .build()
}

/// Writes one split's shards.
pub struct ShardWriter {
    dir: PathBuf,
    split: &'static str,
    max_bytes: usize,
    current: Option<(ArrowWriter<AtomicFile>, usize)>,
    pending: Vec<PackedRow>,
    done: Vec<PathBuf>,
    pub rows: u64,
    pub tokens: u64,
    pub trained: u64,
    pub segments: u64,
}

impl ShardWriter {
    pub fn new(dir: &Path, split: &'static str, max_bytes: usize) -> Self {
        ShardWriter {
            dir: dir.to_path_buf(),
            split,
            max_bytes,
            current: None,
            pending: Vec::new(),
            done: Vec::new(),
            rows: 0,
            tokens: 0,
            trained: 0,
            segments: 0,
        }
    }

    fn temp_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("{}-{i:05}.parquet.partial", self.split))
    }

    pub fn write(&mut self, rows: Vec<PackedRow>) -> Result<()> {
        for r in rows {
            self.rows += 1;
            self.tokens += r.len() as u64;
            self.trained += r.labels.iter().filter(|&&l| l != -100).count() as u64;
            self.segments += r.seq_lengths.len() as u64;
            self.pending.push(r);
            if self.pending.len() == 1024 {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.pending);
        let bytes: usize = rows.iter().map(|r| r.len() * 12 + r.seq_lengths.len() * 4).sum();
        if self.current.is_none() {
            let path = self.temp_path(self.done.len());
            let f = AtomicFile::create(&path)?;
            self.current = Some((ArrowWriter::try_new(f, schema(), Some(props()))?, 0));
        }
        let (w, written) = self.current.as_mut().expect("opened above");
        w.write(&to_batch(&rows)?)?;
        *written += bytes;
        if *written >= self.max_bytes {
            self.close_current()?;
        }
        Ok(())
    }

    fn close_current(&mut self) -> Result<()> {
        if let Some((w, _)) = self.current.take() {
            let path = self.temp_path(self.done.len());
            w.into_inner()?.commit()?;
            self.done.push(path);
        }
        Ok(())
    }

    /// Closes the last shard and gives every file its final `-of-NNNNN` name.
    pub fn finish(mut self) -> Result<Vec<PathBuf>> {
        self.flush()?;
        self.close_current()?;
        let n = self.done.len();
        let mut out = Vec::with_capacity(n);
        for (i, tmp) in self.done.iter().enumerate() {
            let fin = self.dir.join(shard_file_name(self.split, i, n));
            std::fs::rename(tmp, &fin)
                .with_context(|| format!("cannot rename {} to {}", tmp.display(), fin.display()))?;
            out.push(fin);
        }
        Ok(out)
    }
}

fn to_batch(rows: &[PackedRow]) -> Result<RecordBatch> {
    let col = |get: &dyn Fn(&PackedRow) -> &[i32]| -> ArrayRef {
        let total: usize = rows.iter().map(|r| get(r).len()).sum();
        let mut b = ListBuilder::with_capacity(Int32Builder::with_capacity(total), rows.len());
        for r in rows {
            b.values().append_slice(get(r));
            b.append(true);
        }
        Arc::new(b.finish())
    };
    let cols = vec![col(&|r| &r.input_ids), col(&|r| &r.labels), col(&|r| &r.position_ids), col(&|r| &r.seq_lengths)];
    Ok(RecordBatch::try_new(schema(), cols)?)
}

/// Reads every row of a shard file (for inspect, tests and the trainer).
pub fn read_rows(path: &Path) -> Result<Vec<PackedRow>> {
    read_first_rows(path, usize::MAX)
}

/// Reads the first `n` rows of a shard file (only the record batches that hold them).
pub fn read_first_rows(path: &Path, n: usize) -> Result<Vec<PackedRow>> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::Int32Type;
    use arrow_array::Array;
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{}: not a Parquet file", path.display()))?
        .build()?;
    let mut out = Vec::new();
    for batch in reader {
        if out.len() >= n {
            break;
        }
        let batch = batch?;
        let get = |name: &str| -> Result<arrow_array::ListArray> {
            let c = batch.column_by_name(name).with_context(|| format!("{}: no column '{name}'", path.display()))?;
            Ok(c.as_list::<i32>().clone())
        };
        let cols = [get("input_ids")?, get("labels")?, get("position_ids")?, get("seq_lengths")?];
        for i in 0..batch.num_rows().min(n - out.len()) {
            let v = |c: &arrow_array::ListArray| -> Vec<i32> {
                let a = c.value(i);
                a.as_primitive::<Int32Type>().values().to_vec()
            };
            let _ = cols[0].len();
            out.push(PackedRow {
                input_ids: v(&cols[0]),
                labels: v(&cols[1]),
                position_ids: v(&cols[2]),
                seq_lengths: v(&cols[3]),
            });
        }
    }
    Ok(out)
}

/// The `seq_lengths` of every row of a shard file, read alone (the other columns are not decoded).
pub fn read_seq_lengths(path: &Path) -> Result<Vec<Vec<i32>>> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::Int32Type;
    use parquet::arrow::ProjectionMask;
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{}: not a Parquet file", path.display()))?;
    let idx = builder
        .schema()
        .index_of("seq_lengths")
        .with_context(|| format!("{}: no column 'seq_lengths'", path.display()))?;
    let mask = ProjectionMask::roots(builder.parquet_schema(), [idx]);
    let mut out = Vec::new();
    for batch in builder.with_projection(mask).build()? {
        let batch = batch?;
        let col = batch.column(0).as_list::<i32>().clone();
        for i in 0..batch.num_rows() {
            out.push(col.value(i).as_primitive::<Int32Type>().values().to_vec());
        }
    }
    Ok(out)
}

/// Shard files of a split in a directory, in order.
pub fn list_shards(dir: &Path, split: &str) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().to_string())
                .is_some_and(|n| n.starts_with(&format!("{split}-")) && n.ends_with(".parquet"))
        })
        .collect();
    v.sort();
    Ok(v)
}
