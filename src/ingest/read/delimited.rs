//! CSV and TSV: the header names the columns, each record is a raw row with its line. A quote that is
//! never closed makes the parser swallow the rest of the file into one field; quotes are counted as
//! the bytes pass, so the last row is rejected as malformed instead.

use super::{open_decompressed, RawData, RawRow, RowIter};
use crate::accounting::reason;
use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Opens a delimited file: its column names and a stream of its records.
pub fn open(path: &Path, delim: u8) -> Result<(Vec<String>, RowIter)> {
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
    let headers: Vec<String> = headers.into_iter().map(|h| h.trim_start_matches('\u{feff}').to_string()).collect();
    let n = headers.len();
    let name: Arc<str> = Arc::from(path.to_string_lossy().as_ref());
    Ok((headers, Box::new(CsvRows { rdr, n_fields: n, row: 0, name, quotes, held: None })))
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
