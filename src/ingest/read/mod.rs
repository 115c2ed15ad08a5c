//! Streaming row readers, one file per input format: CSV/TSV ([`delimited`]), JSONL and plain text
//! ([`lines`]), JSON arrays ([`json_array`]) and Parquet ([`parquet_table`]), with gzip/zstd
//! decompression by file extension and text decoding ([`ReadOptions`]: `--encoding`, UTF-16 by its
//! BOM; the CSV delimiter detected unless `--delimiter` names it). Readers only split the input into raw rows (cheap,
//! sequential); parsing and mapping happen later in parallel. Memory stays flat in the input size:
//! a JSON array is split into elements by a byte-level scanner, never parsed whole. This file
//! decides the kind of a file and dispatches.

pub mod delimited;
pub mod json_array;
pub mod lines;
pub mod parquet_table;
pub mod spreadsheet;

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
    Spreadsheet,
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
            "xlsx" | "xlsm" | "xlsb" | "xls" | "ods" if base == name => InputKind::Spreadsheet,
            _ => bail!(
                "{}: unknown file type '.{ext}'; tunekit reads .csv, .tsv, .jsonl/.ndjson, .json, .txt \
                 and .parquet (optionally .gz or .zst compressed), and spreadsheets (.xlsx, .xls, .ods)",
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
    /// The CSV/TSV field delimiter used (given or detected).
    pub delimiter: Option<u8>,
    /// The text encoding decoded from, when not UTF-8.
    pub encoding: Option<&'static encoding_rs::Encoding>,
}

/// How a file's bytes become text rows.
#[derive(Debug, Clone, Default)]
pub struct ReadOptions {
    /// The sheet of a spreadsheet input; None: the first.
    pub sheet: Option<String>,
    /// CSV/TSV field delimiter; None: detected from the first records (comma, semicolon, tab, pipe).
    pub delimiter: Option<u8>,
    /// Text encoding; None: UTF-8, or UTF-16 when the file starts with its byte-order mark.
    pub encoding: Option<&'static encoding_rs::Encoding>,
}

impl ReadOptions {
    /// `--encoding NAME` as the WHATWG encoding labels name them (windows-1252, latin1, utf-16le, shift_jis, ...).
    pub fn parse_encoding(label: &str) -> Result<&'static encoding_rs::Encoding> {
        let squeezed: String = label.trim().chars().filter(|c| !matches!(c, '-' | '_' | ' ')).collect();
        let found = encoding_rs::Encoding::for_label(label.trim().as_bytes())
            .or_else(|| encoding_rs::Encoding::for_label(squeezed.as_bytes()));
        found.ok_or_else(|| {
            anyhow::anyhow!(
                "--encoding {label:?}: unknown encoding; use a WHATWG label such as utf-8, windows-1252, latin1, \
                 iso-8859-15, utf-16le, utf-16be, shift_jis, gbk"
            )
        })
    }

    /// `--delimiter C`: one ASCII character, or `tab` (also a literal backslash-t).
    pub fn parse_delimiter(spec: &str) -> Result<u8> {
        match spec {
            "tab" | "\\t" | "\t" => Ok(b'\t'),
            s if s.len() == 1 && s.is_ascii() && s != "\"" && s != "\n" && s != "\r" => Ok(s.as_bytes()[0]),
            _ => bail!("--delimiter {spec:?}: give one ASCII character (for example , ; | or tab)"),
        }
    }
}

/// A delimiter as people write it, for summaries and messages.
pub fn delimiter_name(d: u8) -> String {
    match d {
        b'\t' => "tab".into(),
        d => format!("'{}'", d as char),
    }
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

/// A text file's bytes as UTF-8: decompressed, then decoded from `encoding` or, without one, from
/// UTF-16 when the file starts with a UTF-16 byte-order mark. UTF-8 passes through untouched (its
/// invalid bytes are rejected row by row later, not replaced). Returns the encoding decoded from.
pub fn open_text(
    path: &Path,
    encoding: Option<&'static encoding_rs::Encoding>,
) -> Result<(Box<dyn BufRead + Send>, Option<&'static encoding_rs::Encoding>)> {
    let mut r = open_decompressed(path)?;
    let head = r.fill_buf().with_context(|| format!("{}: read error", path.display()))?;
    let bom = encoding_rs::Encoding::for_bom(head).map(|(e, _)| e);
    let enc = match (encoding, bom) {
        (Some(e), _) if e != encoding_rs::UTF_8 => Some(e),
        (None, Some(e)) if e != encoding_rs::UTF_8 => Some(e),
        _ => None,
    };
    let Some(enc) = enc else { return Ok((r, None)) };
    let decoded = encoding_rs_io::DecodeReaderBytesBuilder::new().encoding(Some(enc)).bom_sniffing(true).build(r);
    Ok((Box::new(BufReader::with_capacity(1 << 20, decoded)), Some(enc)))
}

/// Opens one input and returns its description and a stream of raw rows.
pub fn open_rows(path: &Path, read: &ReadOptions) -> Result<(Source, RowIter)> {
    let kind = InputKind::from_path(path)?;
    let name: Arc<str> = Arc::from(path.to_string_lossy().as_ref());
    let mut source = Source { name: name.clone(), kind, csv_headers: None, delimiter: None, encoding: None };
    let text = |source: &mut Source| -> Result<Box<dyn BufRead + Send>> {
        let (r, enc) = open_text(path, read.encoding)?;
        source.encoding = enc;
        Ok(r)
    };
    let rows: RowIter = match kind {
        InputKind::Csv | InputKind::Tsv => {
            let r = text(&mut source)?;
            let default = if kind == InputKind::Csv { None } else { Some(b'\t') };
            let (headers, delim, rows) = delimited::open(path, r, read.delimiter.or(default))?;
            source.csv_headers = Some(Arc::new(headers));
            source.delimiter = Some(delim);
            rows
        }
        InputKind::Jsonl => Box::new(LineRows::new(text(&mut source)?, false)),
        InputKind::Text => Box::new(LineRows::new(text(&mut source)?, true)),
        InputKind::Json => {
            let mut r = text(&mut source)?;
            if json_array::first_non_ws(&mut r)? == Some(b'[') {
                Box::new(json_array::ArrayElements::new(r))
            } else {
                Box::new(LineRows::new(r, false))
            }
        }
        InputKind::Parquet => Box::new(parquet_table::ParquetRows::open(path)?),
        InputKind::Spreadsheet => {
            let (headers, rows) = spreadsheet::open(path, read.sheet.as_deref())?;
            source.csv_headers = Some(Arc::new(headers));
            rows
        }
    };
    Ok((source, rows))
}

pub fn utf8_detail(e: std::str::Utf8Error) -> String {
    format!(
        "invalid UTF-8 at byte {} of the row; if the file is in another encoding, say which with --encoding \
         (for example --encoding windows-1252 for Excel exports in Western Europe), or re-encode it as UTF-8",
        e.valid_up_to()
    )
}
