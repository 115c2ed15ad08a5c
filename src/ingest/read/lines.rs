//! Line-based inputs: JSONL (one JSON value per line) and plain text (each line a `{"text": ...}`
//! row). Blank lines are skipped but counted as lines; a UTF-8 BOM on the first line is dropped.

use super::{utf8_detail, RawData, RawRow};
use crate::accounting::reason;
use anyhow::Result;
use serde_json::{Map, Value};
use std::io::BufRead;

/// JSONL lines (or text lines, as `{"text": line}`); blank lines are skipped but counted as lines.
pub struct LineRows {
    r: Box<dyn BufRead + Send>,
    text: bool,
    line: u64,
    row: u64,
    /// Reused line buffer; each row gets an exact-size copy.
    buf: Vec<u8>,
}

impl LineRows {
    pub fn new(r: Box<dyn BufRead + Send>, text: bool) -> Self {
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
