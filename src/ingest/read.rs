//! Streaming row readers for CSV/TSV, JSONL, JSON arrays, plain text and Parquet, with gzip/zstd
//! decompression by file extension. Readers only split the input into raw rows (cheap,
//! sequential); parsing and mapping happen later in parallel. Memory stays flat in the input size:
//! a JSON array is split into elements by a byte-level scanner, never parsed whole.

use crate::accounting::reason;
use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
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
            let delim = if kind == InputKind::Csv { b',' } else { b'\t' };
            let quotes = Arc::new(AtomicU64::new(0));
            let counted = QuoteCounter { inner: open_decompressed(path)?, quotes: quotes.clone() };
            let mut rdr =
                csv::ReaderBuilder::new().flexible(true).delimiter(delim).buffer_capacity(1 << 20).from_reader(counted);
            let headers = rdr
                .byte_headers()
                .with_context(|| format!("{}: cannot read the CSV header line", path.display()))?
                .iter()
                .map(|h| String::from_utf8(h.to_vec()))
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("{}: the CSV header is not valid UTF-8", path.display()))?;
            if headers.iter().all(|h| h.trim().is_empty()) {
                bail!("{}: empty CSV header; the first line must name the columns", path.display());
            }
            let headers: Vec<String> =
                headers.into_iter().map(|h| h.trim_start_matches('\u{feff}').to_string()).collect();
            let n = headers.len();
            source.csv_headers = Some(Arc::new(headers));
            Box::new(CsvRows { rdr, n_fields: n, row: 0, name: name.clone(), quotes, held: None })
        }
        InputKind::Jsonl => Box::new(LineRows::new(open_decompressed(path)?, false)),
        InputKind::Text => Box::new(LineRows::new(open_decompressed(path)?, true)),
        InputKind::Json => {
            let mut r = open_decompressed(path)?;
            if first_non_ws(&mut r)? == Some(b'[') {
                Box::new(ArrayElements::new(r))
            } else {
                Box::new(LineRows::new(r, false))
            }
        }
        InputKind::Parquet => Box::new(super::parquet_rows::ParquetRows::open(path)?),
    };
    Ok((source, rows))
}

/// Skips a UTF-8 BOM and whitespace; returns the next byte without consuming it.
fn first_non_ws(r: &mut Box<dyn BufRead + Send>) -> Result<Option<u8>> {
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(None);
        }
        let skip = if buf.starts_with(&[0xEF, 0xBB, 0xBF]) {
            3
        } else {
            buf.iter().take_while(|b| b.is_ascii_whitespace()).count()
        };
        if skip == 0 {
            return Ok(Some(buf[0]));
        }
        r.consume(skip);
    }
}

/// Counts quote characters passing through, so an unbalanced quote (which makes the CSV parser
/// swallow the rest of the file into one field) can be detected at the end.
struct QuoteCounter<R> {
    inner: R,
    quotes: Arc<AtomicU64>,
}

impl<R: Read> Read for QuoteCounter<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let q = memchr::memchr_iter(b'"', &buf[..n]).count() as u64;
        self.quotes.fetch_add(q, Ordering::Relaxed);
        Ok(n)
    }
}

struct CsvRows<R: Read> {
    rdr: csv::Reader<R>,
    n_fields: usize,
    row: u64,
    name: Arc<str>,
    quotes: Arc<AtomicU64>,
    /// One record of lookahead: the last record is only final once EOF shows the quotes balance.
    held: Option<RawRow>,
}

impl<R: Read> Iterator for CsvRows<R> {
    type Item = Result<RawRow>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.held.is_none() {
            match self.read_one()? {
                Ok(r) => self.held = Some(r),
                Err(e) => return Some(Err(e)),
            }
        }
        match self.read_one() {
            Some(Ok(next)) => self.held.replace(next).map(Ok),
            Some(Err(e)) => Some(Err(e)),
            None => {
                let mut last = self.held.take()?;
                if self.quotes.load(Ordering::Relaxed) % 2 == 1 {
                    last.data = RawData::Bad {
                        reason: reason::MALFORMED_CSV,
                        detail: "unbalanced quote: a quoted field is never closed, so it runs to the end of the file"
                            .into(),
                    };
                }
                Some(Ok(last))
            }
        }
    }
}

impl<R: Read> CsvRows<R> {
    fn read_one(&mut self) -> Option<Result<RawRow>> {
        let mut rec = csv::ByteRecord::new();
        match self.rdr.read_byte_record(&mut rec) {
            Ok(false) => None,
            Ok(true) => {
                self.row += 1;
                let line = rec.position().map(|p| p.line());
                let data = if rec.len() != self.n_fields {
                    let hint = if rec.iter().any(|f| f.contains(&b'\n')) {
                        "; a field spans several lines, which usually means an unbalanced quote"
                    } else {
                        "; check for unescaped delimiters or unbalanced quotes"
                    };
                    RawData::Bad {
                        reason: if hint.contains("spans") { reason::MALFORMED_CSV } else { reason::WRONG_FIELD_COUNT },
                        detail: format!(
                            "expected {} fields (as in the header), found {}{hint}",
                            self.n_fields,
                            rec.len()
                        ),
                    }
                } else {
                    RawData::Csv(rec)
                };
                Some(Ok(RawRow { row: self.row, line, data }))
            }
            Err(e) => {
                if let csv::ErrorKind::Io(_) = e.kind() {
                    Some(Err(anyhow::Error::new(e).context(format!("{}: read error", self.name))))
                } else {
                    self.row += 1;
                    let line = e.position().map(|p| p.line());
                    Some(Ok(RawRow {
                        row: self.row,
                        line,
                        data: RawData::Bad { reason: reason::MALFORMED_CSV, detail: e.to_string() },
                    }))
                }
            }
        }
    }
}

/// JSONL lines (or text lines, as `{"text": line}`); blank lines are skipped but counted as lines.
struct LineRows {
    r: Box<dyn BufRead + Send>,
    text: bool,
    line: u64,
    row: u64,
    /// Reused line buffer; each row gets an exact-size copy.
    buf: Vec<u8>,
}

impl LineRows {
    fn new(r: Box<dyn BufRead + Send>, text: bool) -> Self {
        LineRows { r, text, line: 0, row: 0, buf: Vec::with_capacity(1 << 16) }
    }
}

impl Iterator for LineRows {
    type Item = Result<RawRow>;
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            self.buf.clear();
            match self.r.read_until(b'\n', &mut self.buf) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => return Some(Err(e.into())),
            }
            let mut buf = self.buf.clone();
            self.line += 1;
            while matches!(buf.last(), Some(b'\n') | Some(b'\r')) {
                buf.pop();
            }
            if self.line == 1 && buf.starts_with(&[0xEF, 0xBB, 0xBF]) {
                buf.drain(..3);
            }
            if buf.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            self.row += 1;
            let data = if self.text {
                match String::from_utf8(buf) {
                    Ok(s) => {
                        let mut m = Map::new();
                        m.insert("text".into(), Value::String(s));
                        RawData::Object(m)
                    }
                    Err(e) => RawData::Bad { reason: reason::INVALID_UTF8, detail: utf8_detail(e.utf8_error()) },
                }
            } else {
                RawData::Json(buf)
            };
            return Some(Ok(RawRow { row: self.row, line: Some(self.line), data }));
        }
    }
}

pub fn utf8_detail(e: std::str::Utf8Error) -> String {
    format!("invalid UTF-8 at byte {} of the row; re-encode the file as UTF-8", e.valid_up_to())
}

/// Splits a top-level JSON array into element texts without parsing them.
struct ArrayElements {
    r: Box<dyn BufRead + Send>,
    started: bool,
    done: bool,
    line: u64,
    row: u64,
}

impl ArrayElements {
    fn new(r: Box<dyn BufRead + Send>) -> Self {
        ArrayElements { r, started: false, done: false, line: 1, row: 0 }
    }
    /// Reads the next element's bytes; `Ok(None)` at the closing bracket.
    fn next_element(&mut self) -> Result<Option<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        let (mut depth, mut in_str, mut esc) = (0i32, false, false);
        let mut start_line = self.line;
        let mut seen = false;
        loop {
            let buf = self.r.fill_buf()?;
            if buf.is_empty() {
                if seen {
                    bail!("the JSON array is cut off (no closing ']'); the element starting at line {start_line} is incomplete");
                }
                bail!("the JSON array has no closing ']'");
            }
            let mut used = 0;
            for &b in buf {
                used += 1;
                if b == b'\n' {
                    self.line += 1;
                }
                if !self.started {
                    if b == b'[' {
                        self.started = true;
                    }
                    continue;
                }
                if !seen && !b.is_ascii_whitespace() && b != b',' && b != b']' {
                    seen = true;
                    start_line = self.line;
                }
                if in_str {
                    out.push(b);
                    if esc {
                        esc = false;
                    } else if b == b'\\' {
                        esc = true;
                    } else if b == b'"' {
                        in_str = false;
                    }
                    continue;
                }
                match b {
                    b'"' => {
                        in_str = true;
                        out.push(b)
                    }
                    b'{' | b'[' => {
                        depth += 1;
                        out.push(b)
                    }
                    b'}' | b']' if depth > 0 => {
                        depth -= 1;
                        out.push(b)
                    }
                    b']' => {
                        self.r.consume(used);
                        self.done = true;
                        return Ok(if seen { Some((start_line, out)) } else { None });
                    }
                    b',' if depth == 0 => {
                        self.r.consume(used);
                        return Ok(Some((start_line, out)));
                    }
                    _ => {
                        if seen {
                            out.push(b)
                        }
                    }
                }
            }
            self.r.consume(used);
        }
    }
}

impl Iterator for ArrayElements {
    type Item = Result<RawRow>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.next_element() {
            Ok(Some((line, bytes))) => {
                self.row += 1;
                Some(Ok(RawRow { row: self.row, line: Some(line), data: RawData::Json(bytes) }))
            }
            Ok(None) => None,
            Err(e) => {
                self.done = true;
                self.row += 1;
                Some(Ok(RawRow {
                    row: self.row,
                    line: Some(self.line),
                    data: RawData::Bad { reason: reason::INVALID_JSON, detail: e.to_string() },
                }))
            }
        }
    }
}
