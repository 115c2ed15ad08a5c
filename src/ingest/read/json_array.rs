//! A top-level JSON array split into its elements' texts by a byte-level scanner, without parsing
//! them: one raw row per element, the line where it starts kept for rejects.

use super::{RawData, RawRow};
use crate::accounting::reason;
use anyhow::{bail, Result};
use std::io::BufRead;

/// Skips a UTF-8 BOM and whitespace; returns the next byte without consuming it.
pub fn first_non_ws(r: &mut Box<dyn BufRead + Send>) -> Result<Option<u8>> {
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

/// Splits a top-level JSON array into element texts without parsing them.
pub struct ArrayElements {
    r: Box<dyn BufRead + Send>,
    started: bool,
    done: bool,
    line: u64,
    row: u64,
}

impl ArrayElements {
    pub fn new(r: Box<dyn BufRead + Send>) -> Self {
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
