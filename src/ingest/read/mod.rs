//! Streaming row readers, one file per input format: CSV/TSV ([`delimited`]), JSONL and plain text
//! ([`lines`]), JSON arrays ([`json_array`]) and Parquet ([`parquet_table`]), with gzip/zstd
//! decompression by file extension. Readers only split the input into raw rows (cheap,
//! sequential); parsing and mapping happen later in parallel. Memory stays flat in the input size:
//! a JSON array is split into elements by a byte-level scanner, never parsed whole. This file
//! decides the kind of a file and dispatches.

pub mod delimited;
pub mod json_array;
pub mod lines;
pub mod parquet_table;

use lines::LineRows;

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::sync::Arc;

/// The physical kind of an input file, decided by its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    Csv,
    Tsv,
    Jsonl,
    Json,
    Text,
    Parquet,
}

impl InputKind {
    pub fn from_path(path: &Path) -> Result<InputKind> {
        let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
        let base = name.trim_end_matches(".gz").trim_end_matches(".zst").trim_end_matches(".zstd");
        let ext = base.rsplit('.').next().unwrap_or("");
        Ok(match ext {
            "csv" => InputKind::Csv,
            "tsv" | "tab" => InputKind::Tsv,
            "jsonl" | "ndjson" => InputKind::Jsonl,
            "json" => InputKind::Json,
            "txt" | "text" => InputKind::Text,
            "parquet" | "pq" => InputKind::Parquet,
            _ => bail!(
                "{}: unknown file type '.{ext}'; tunekit reads .csv, .tsv, .jsonl/.ndjson, .json, .txt \
                 and .parquet (optionally .gz or .zst compressed)",
                path.display()
            ),
        })
    }
}

/// One raw row as split from the file, not yet parsed.
#[derive(Debug)]
pub struct RawRow {
    /// 1-based record number within the source.
    pub row: u64,
    /// 1-based line where the record starts (line-based formats).
    pub line: Option<u64>,
    pub data: RawData,
}

#[derive(Debug)]
pub enum RawData {
    /// One JSON value's text (a JSONL line or a JSON array element).
    Json(Vec<u8>),
    /// One CSV record; headers live in the [`Source`].
    Csv(csv::ByteRecord),
    /// A row already in object form (Parquet, text lines).
    Object(Map<String, Value>),
    /// A row the splitter already knows is bad.
    Bad { reason: &'static str, detail: String },
}

/// What is known about one input file.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: Arc<str>,
    pub kind: InputKind,
    pub csv_headers: Option<Arc<Vec<String>>>,
}

pub type RowIter = Box<dyn Iterator<Item = Result<RawRow>> + Send>;

/// Opens a file for reading, decompressing `.gz` and `.zst` transparently.
pub fn open_decompressed(path: &Path) -> Result<Box<dyn BufRead + Send>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let name = path.to_string_lossy().to_lowercase();
    let reader: Box<dyn Read + Send> = if name.ends_with(".gz") {
        Box::new(flate2::read::MultiGzDecoder::new(BufReader::with_capacity(1 << 16, file)))
    } else if name.ends_with(".zst") || name.ends_with(".zstd") {
        Box::new(zstd::Decoder::new(file).with_context(|| format!("{}: not a zstd file", path.display()))?)
    } else {
        Box::new(file)
    };
    Ok(Box::new(BufReader::with_capacity(1 << 20, reader)))
}

/// Opens one input and returns its description and a stream of raw rows.
pub fn open_rows(path: &Path) -> Result<(Source, RowIter)> {
    let kind = InputKind::from_path(path)?;
    let name: Arc<str> = Arc::from(path.to_string_lossy().as_ref());
    let mut source = Source { name: name.clone(), kind, csv_headers: None };
    let rows: RowIter = match kind {
        InputKind::Csv | InputKind::Tsv => {
            let (headers, rows) = delimited::open(path, if kind == InputKind::Csv { b',' } else { b'\t' })?;
            source.csv_headers = Some(Arc::new(headers));
            rows
        }
        InputKind::Jsonl => Box::new(LineRows::new(open_decompressed(path)?, false)),
        InputKind::Text => Box::new(LineRows::new(open_decompressed(path)?, true)),
        InputKind::Json => {
            let mut r = open_decompressed(path)?;
            if json_array::first_non_ws(&mut r)? == Some(b'[') {
                Box::new(json_array::ArrayElements::new(r))
            } else {
                Box::new(LineRows::new(r, false))
            }
        }
        InputKind::Parquet => Box::new(parquet_table::ParquetRows::open(path)?),
    };
    Ok((source, rows))
}

pub fn utf8_detail(e: std::str::Utf8Error) -> String {
    format!("invalid UTF-8 at byte {} of the row; re-encode the file as UTF-8", e.valid_up_to())
}
