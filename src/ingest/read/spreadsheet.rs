//! Spreadsheets (.xlsx, .xlsm, .xlsb, .xls, .ods) through calamine: one sheet (`--sheet NAME`, else
//! the first), its first row the column names, each later row a raw row numbered as the
//! spreadsheet numbers it. Cells read as the spreadsheet shows them: numbers without a trailing
//! `.0`, dates as `YYYY-MM-DD` (with the time when it has one), booleans as TRUE/FALSE, error cells
//! as their text (`#DIV/0!`). Rows with no value in any cell are not rows of data and are skipped.
//! A sheet is read whole (calamine parses it at once); spreadsheets are small next to the CSV and
//! JSONL corpora the streaming readers are for.

use super::{RawData, RawRow, RowIter};
use anyhow::{bail, Context, Result};
use calamine::{Data, Reader};
use serde_json::{Map, Value};
use std::path::Path;

/// Opens sheet `sheet` (or the first) of a workbook: its column names and its rows.
pub fn open(path: &Path, sheet: Option<&str>) -> Result<(Vec<String>, RowIter)> {
    let mut book = calamine::open_workbook_auto(path)
        .with_context(|| format!("{}: cannot open the spreadsheet", path.display()))?;
    let names = book.sheet_names();
    let name = match sheet {
        Some(s) => names.iter().find(|n| n.as_str() == s).cloned().ok_or_else(|| {
            anyhow::anyhow!("{}: no sheet named {s:?}; its sheets are: {}", path.display(), names.join(", "))
        })?,
        None => names.first().cloned().with_context(|| format!("{}: the workbook has no sheet", path.display()))?,
    };
    let range =
        book.worksheet_range(&name).with_context(|| format!("{}: cannot read sheet {name:?}", path.display()))?;
    let first_row = range.start().map(|(r, _)| r as u64 + 1).unwrap_or(1);
    let mut rows = range.rows();
    let Some(header) = rows.next() else {
        bail!("{}: sheet {name:?} is empty; its first row must name the columns", path.display());
    };
    let headers: Vec<String> = header.iter().map(|c| shown(c).unwrap_or_default().trim().to_string()).collect();
    super::delimited::check_header(path, &headers, &format!("sheet {name:?}"))?;
    let records: Vec<RawRow> = rows
        .enumerate()
        .filter_map(|(i, cells)| {
            let mut obj = Map::new();
            for (h, c) in headers.iter().zip(cells) {
                if let Some(text) = shown(c) {
                    obj.insert(h.clone(), Value::String(text));
                }
            }
            // Spreadsheet row numbers: the header is `first_row`, data starts below it.
            let row = first_row + 1 + i as u64;
            (!obj.is_empty()).then_some(RawRow { row, line: None, data: RawData::Object(obj) })
        })
        .collect();
    Ok((headers, Box::new(records.into_iter().map(Ok))))
}

/// A cell's text as the spreadsheet shows it; None for an empty cell.
fn shown(cell: &Data) -> Option<String> {
    Some(match cell {
        Data::Empty => return None,
        Data::String(s) if s.is_empty() => return None,
        Data::String(s) | Data::DateTimeIso(s) | Data::DurationIso(s) => s.clone(),
        Data::Int(i) => i.to_string(),
        Data::Float(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{f:.0}"),
        Data::Float(f) => f.to_string(),
        Data::Bool(b) => if *b { "TRUE" } else { "FALSE" }.to_string(),
        Data::DateTime(d) => {
            let (y, mo, day, h, mi, s, _) = d.to_ymd_hms_milli();
            if d.is_duration() {
                let total = d.as_f64() * 24.0;
                format!("{:02}:{mi:02}:{s:02}", total.floor() as u64)
            } else if (h, mi, s) == (0, 0, 0) {
                format!("{y:04}-{mo:02}-{day:02}")
            } else {
                format!("{y:04}-{mo:02}-{day:02} {h:02}:{mi:02}:{s:02}")
            }
        }
        Data::Error(e) => e.to_string(),
    })
}
