//! Raw row to JSON object, with a reject (reason + detail) when the row cannot be parsed.

use super::read::{open_rows, utf8_detail, RawData, RawRow, ReadOptions, Source};
use crate::accounting::{reason, Reject};
use anyhow::{bail, Result};
use serde_json::{Map, Value};
use std::path::Path;

pub fn reject(
    src: &Source,
    raw_row: u64,
    line: Option<u64>,
    field: Option<&str>,
    reason: &'static str,
    detail: String,
) -> Reject {
    Reject { source: src.name.to_string(), row: raw_row, line, field: field.map(str::to_string), reason, detail }
}

/// Parses the raw row into an object (CSV fields become strings).
pub fn to_object(src: &Source, raw: RawRow) -> Result<Map<String, Value>, Reject> {
    let bad = |reason, detail| Err(reject(src, raw.row, raw.line, None, reason, detail));
    match raw.data {
        RawData::Object(m) => Ok(m),
        RawData::Bad { reason, detail } => bad(reason, detail),
        RawData::Json(bytes) => {
            match serde_json::from_slice::<Value>(&bytes) {
                Ok(Value::Object(m)) => Ok(m),
                Ok(other) => bad(
                    reason::NOT_AN_OBJECT,
                    format!("expected a JSON object with named fields, found {}", json_kind(&other)),
                ),
                // serde_json validates UTF-8 as it parses; classify the failure only when it happens.
                Err(e) => match std::str::from_utf8(&bytes) {
                    Err(u) => bad(reason::INVALID_UTF8, utf8_detail(u)),
                    Ok(_) => bad(reason::INVALID_JSON, format!("invalid JSON: {e}")),
                },
            }
        }
        RawData::Csv(rec) => {
            let headers = src.csv_headers.as_ref().expect("CSV source has headers");
            let mut m = Map::with_capacity(headers.len());
            for (h, f) in headers.iter().zip(rec.iter()) {
                match std::str::from_utf8(f) {
                    Ok(s) => {
                        m.insert(h.clone(), Value::String(s.to_string()));
                    }
                    Err(e) => {
                        return Err(reject(src, raw.row, raw.line, Some(h), reason::INVALID_UTF8, utf8_detail(e)));
                    }
                }
            }
            Ok(m)
        }
    }
}

pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Every row of a file as `("file:row", text)`: the named columns' text, or every text column's,
/// joined by newlines (evaluation sets for decontamination). Rows that cannot be read are errors.
pub fn row_texts(path: &Path, columns: &[String]) -> Result<Vec<(String, String)>> {
    let (source, rows) = open_rows(path, &ReadOptions::default())?;
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let mut out = vec![];
    for raw in rows {
        let raw = raw?;
        let row = raw.row;
        let obj = to_object(&source, raw).map_err(|r| anyhow::anyhow!("{r}"))?;
        let text: Vec<String> = match columns.is_empty() {
            true => obj.values().filter_map(|v| v.as_str().map(str::to_string)).collect(),
            false => columns
                .iter()
                .filter_map(|c| obj.get(c))
                .map(|v| v.as_str().map_or(v.to_string(), str::to_string))
                .collect(),
        };
        out.push((format!("{name}:{row}"), text.join("\n")));
    }
    if out.is_empty() {
        bail!("{}: no rows to decontaminate against", path.display());
    }
    Ok(out)
}
