//! CSV and TSV: the header names the columns, each record is a raw row with its line. The delimiter
//! (comma, semicolon, tab or pipe) is detected from the first records unless given. A quote that is
//! never closed makes the parser swallow the rest of the file into one field; quotes are counted as
//! the bytes pass, so the last row is rejected as malformed instead.

use super::{RawData, RawRow, RowIter};
use crate::accounting::reason;
use anyhow::{bail, Context, Result};
use std::collections::VecDeque;
use std::io::{BufRead, Read};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The delimiters detection chooses among, the first winning ties.
const CANDIDATES: [u8; 4] = [b',', b';', b'\t', b'|'];
/// How much of the file detection looks at.
const SNIFF_BYTES: u64 = 256 * 1024;
/// And how many records of it.
const SNIFF_RECORDS: usize = 50;

/// The delimiter that splits the sample's records most consistently: each candidate parses the
/// first records; the one whose header has the most fields (more than one) and whose records
/// mostly have as many wins; comma when none splits the header.
pub fn detect_delimiter(sample: &[u8]) -> u8 {
    let mut best = (b',', 0usize, 0usize); // (delimiter, consistent records, header fields)
    for d in CANDIDATES {
        let mut rdr = csv::ReaderBuilder::new().flexible(true).has_headers(false).delimiter(d).from_reader(sample);
        let mut rec = csv::ByteRecord::new();
        let mut header = 0;
        let mut same = 0;
        let mut n = 0;
        while n < SNIFF_RECORDS && rdr.read_byte_record(&mut rec).unwrap_or(false) {
            if n == 0 {
                header = rec.len();
            } else if rec.len() == header {
                same += 1;
            }
            n += 1;
        }
        // A record cut by the end of the sample may be short: allow one inconsistent record.
        let consistent = n <= 2 || same + 2 >= n;
        if header > 1 && consistent && (header, same) > (best.2, best.1) {
            best = (d, same, header);
        }
    }
    best.0
}

/// Opens a delimited file's text: its column names, the delimiter used (given, else detected) and
/// a stream of its records.
pub fn open(path: &Path, text: Box<dyn BufRead + Send>, delim: Option<u8>) -> Result<(Vec<String>, u8, RowIter)> {
    let mut text = text;
    let mut sample = Vec::new();
    (&mut text)
        .take(SNIFF_BYTES)
        .read_to_end(&mut sample)
        .with_context(|| format!("{}: read error", path.display()))?;
    let delim = delim.unwrap_or_else(|| detect_delimiter(&sample));
    let whole: Box<dyn Read + Send> = Box::new(std::io::Cursor::new(sample).chain(text));
    let quotes = Arc::new(AtomicU64::new(0));
    let lines = Arc::new(Mutex::new(LineIndex::default()));
    let counted =
        QuoteCounter { inner: whole, quotes: quotes.clone(), lines: lines.clone(), offset: 0, cr_pending: false };
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
    check_header(path, &headers, &format!("delimiter {}", super::delimiter_name(delim)))?;
    let n = headers.len();
    let name: Arc<str> = Arc::from(path.to_string_lossy().as_ref());
    Ok((headers, delim, Box::new(CsvRows { rdr, n_fields: n, row: 0, name, quotes, lines, held: None })))
}

/// Two columns of one name would leave one of them unreadable, and an unnamed column cannot be
/// mapped: both are errors that name the columns.
pub(super) fn check_header(path: &Path, headers: &[String], read_as: &str) -> Result<()> {
    let mut seen = std::collections::HashMap::new();
    let mut dups = vec![];
    for (i, h) in headers.iter().enumerate() {
        if let Some(first) = seen.insert(h.trim(), i) {
            dups.push(format!("'{}' (columns {} and {})", h.trim(), first + 1, i + 1));
        }
    }
    let empty: Vec<String> =
        headers.iter().enumerate().filter(|(_, h)| h.trim().is_empty()).map(|(i, _)| (i + 1).to_string()).collect();
    if !empty.is_empty() {
        bail!(
            "{}: the header has no name for column(s) {} ({read_as}); name every column in the first line",
            path.display(),
            empty.join(", ")
        );
    }
    if !dups.is_empty() {
        bail!(
            "{}: the header names a column twice: {} ({read_as}); rename one of them in the first line",
            path.display(),
            dups.join(", ")
        );
    }
    Ok(())
}

/// Counts quote characters passing through, so an unbalanced quote (which makes the CSV parser
/// swallow the rest of the file into one field) can be detected at the end; and notes where lines
/// break, so a record's line is right for LF, CRLF and CR files alike (the parser's own line count
/// is one short after a CRLF).
struct QuoteCounter<R> {
    inner: R,
    quotes: Arc<AtomicU64>,
    lines: Arc<Mutex<LineIndex>>,
    /// Bytes read so far.
    offset: u64,
    /// The last byte read was a CR: a line break unless the next byte is LF.
    cr_pending: bool,
}

impl<R: Read> Read for QuoteCounter<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let chunk = &buf[..n];
        let q = memchr::memchr_iter(b'"', chunk).count() as u64;
        self.quotes.fetch_add(q, Ordering::Relaxed);
        let mut idx = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        if self.cr_pending && chunk.first() != Some(&b'\n') {
            idx.breaks.push_back(self.offset - 1);
        }
        for i in memchr::memchr2_iter(b'\n', b'\r', chunk) {
            // CRLF breaks once, at its LF; a lone CR breaks where it is.
            match chunk[i] {
                b'\n' => idx.breaks.push_back(self.offset + i as u64),
                _ if i + 1 < n && chunk[i + 1] != b'\n' => idx.breaks.push_back(self.offset + i as u64),
                _ => {}
            }
        }
        self.cr_pending = n > 0 && chunk[n - 1] == b'\r';
        self.offset += n as u64;
        Ok(n)
    }
}

/// The line breaks read but not yet passed by a record, and how many were passed before them.
#[derive(Default)]
struct LineIndex {
    breaks: VecDeque<u64>,
    passed: u64,
}

impl LineIndex {
    /// The 1-based line of a record starting at byte `start` (the parser's start is the byte after
    /// the previous record's terminator, which for CRLF is its LF: breaks at `start` count).
    fn line_at(&mut self, start: u64) -> u64 {
        while self.breaks.front().is_some_and(|&b| b <= start) {
            self.breaks.pop_front();
            self.passed += 1;
        }
        self.passed + 1
    }
}

struct CsvRows<R: Read> {
    rdr: csv::Reader<R>,
    n_fields: usize,
    row: u64,
    name: Arc<str>,
    quotes: Arc<AtomicU64>,
    lines: Arc<Mutex<LineIndex>>,
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
    fn line_at(&self, byte: u64) -> u64 {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).line_at(byte)
    }

    fn read_one(&mut self) -> Option<Result<RawRow>> {
        let mut rec = csv::ByteRecord::new();
        match self.rdr.read_byte_record(&mut rec) {
            Ok(false) => None,
            Ok(true) => {
                self.row += 1;
                let line = rec.position().map(|p| self.line_at(p.byte()));
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
                    let line = e.position().map(|p| self.line_at(p.byte()));
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
