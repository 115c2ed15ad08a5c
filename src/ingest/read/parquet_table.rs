//! Parquet input: record batches turned into one JSON object per row (strings, numbers, booleans,
//! lists and structs; other Arrow types are rendered as text).

use super::{RawData, RawRow};
use anyhow::{Context, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use serde_json::{Map, Number, Value};
use std::collections::VecDeque;
use std::fs::File;
use std::path::Path;

pub struct ParquetRows {
    reader: ParquetRecordBatchReader,
    pending: VecDeque<Map<String, Value>>,
    row: u64,
    name: String,
}

impl ParquetRows {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .with_context(|| format!("{}: not a readable Parquet file", path.display()))?
            .with_batch_size(2048)
            .build()?;
        Ok(ParquetRows { reader, pending: VecDeque::new(), row: 0, name: path.display().to_string() })
    }
}

impl Iterator for ParquetRows {
    type Item = Result<RawRow>;
    fn next(&mut self) -> Option<Self::Item> {
        while self.pending.is_empty() {
            match self.reader.next()? {
                Ok(batch) => self.pending.extend(batch_to_objects(&batch)),
                Err(e) => {
                    return Some(Err(anyhow::Error::new(e).context(format!("{}: Parquet read error", self.name))))
                }
            }
        }
        self.row += 1;
        let obj = self.pending.pop_front()?;
        Some(Ok(RawRow { row: self.row, line: None, data: RawData::Object(obj) }))
    }
}

pub fn batch_to_objects(batch: &RecordBatch) -> Vec<Map<String, Value>> {
    let schema = batch.schema();
    (0..batch.num_rows())
        .map(|i| {
            let mut m = Map::new();
            for (f, col) in schema.fields().iter().zip(batch.columns()) {
                m.insert(f.name().clone(), value_at(col.as_ref(), i));
            }
            m
        })
        .collect()
}

fn num<T: Into<f64> + Copy>(v: T) -> Value {
    Number::from_f64(v.into()).map(Value::Number).unwrap_or(Value::Null)
}

/// One cell of an Arrow array as JSON.
pub fn value_at(a: &dyn Array, i: usize) -> Value {
    if a.is_null(i) {
        return Value::Null;
    }
    match a.data_type() {
        DataType::Utf8 => Value::String(a.as_string::<i32>().value(i).to_string()),
        DataType::LargeUtf8 => Value::String(a.as_string::<i64>().value(i).to_string()),
        DataType::Utf8View => Value::String(a.as_string_view().value(i).to_string()),
        DataType::Boolean => Value::Bool(a.as_boolean().value(i)),
        DataType::Int8 => Value::from(a.as_primitive::<Int8Type>().value(i)),
        DataType::Int16 => Value::from(a.as_primitive::<Int16Type>().value(i)),
        DataType::Int32 => Value::from(a.as_primitive::<Int32Type>().value(i)),
        DataType::Int64 => Value::from(a.as_primitive::<Int64Type>().value(i)),
        DataType::UInt8 => Value::from(a.as_primitive::<UInt8Type>().value(i)),
        DataType::UInt16 => Value::from(a.as_primitive::<UInt16Type>().value(i)),
        DataType::UInt32 => Value::from(a.as_primitive::<UInt32Type>().value(i)),
        DataType::UInt64 => Value::from(a.as_primitive::<UInt64Type>().value(i)),
        DataType::Float32 => num(a.as_primitive::<Float32Type>().value(i)),
        DataType::Float64 => num(a.as_primitive::<Float64Type>().value(i)),
        DataType::List(_) => {
            let l = a.as_list::<i32>().value(i);
            Value::Array((0..l.len()).map(|j| value_at(l.as_ref(), j)).collect())
        }
        DataType::LargeList(_) => {
            let l = a.as_list::<i64>().value(i);
            Value::Array((0..l.len()).map(|j| value_at(l.as_ref(), j)).collect())
        }
        DataType::Struct(fields) => {
            let s = a.as_struct();
            let mut m = Map::new();
            for (f, c) in fields.iter().zip(s.columns()) {
                m.insert(f.name().clone(), value_at(c.as_ref(), i));
            }
            Value::Object(m)
        }
        DataType::Binary => match std::str::from_utf8(a.as_binary::<i32>().value(i)) {
            Ok(s) => Value::String(s.to_string()),
            Err(_) => Value::Null,
        },
        other => Value::String(format!("<unsupported Arrow type {other}>")),
    }
}
