//! The table path: `--sql`, `--limit`, `--sample`. Each input is read by tunekit's own readers (so
//! delimiters, encodings, spreadsheets and row-level rejects work as everywhere), held as a polars
//! table named by its file stem (`data` when there is one input), the query run by polars' SQL over
//! the tables (filters, derived columns, joins), then the first `--limit` rows or a seeded
//! `--sample` of the result kept. The result's rows go through the same mapping as streamed rows;
//! rows the query and the selection leave out are counted as `filtered`, so the counts still add
//! up. Tables are held in memory; without these options the streaming reader stays the path.

use super::formats::Mapper;
use super::item::{Batch, Item, BATCH_ROWS};
use super::options::{MapOptions, Selection};
use super::read::{open_rows, utf8_detail, InputKind, RawData, Source};
use super::rows::{reject, to_object};
use crate::accounting::{reason, RowCtx};
use crate::split::SplitMix64;
use anyhow::{bail, Context, Result};
use polars::prelude::{Column, DataFrame, DataType, IntoColumn, IntoLazy, StringChunked, StringChunkedBuilder};
use rayon::prelude::*;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The hidden column that carries each row's record number through the query (a query that keeps
/// it, as `SELECT *` over one table does, keeps the rows' ids).
const ROW: &str = "__row";

/// One input read whole: its table, how many rows it has, its rejects and the columns that held
/// JSON lists or objects.
struct Loaded {
    source: Source,
    table: DataFrame,
    rows: usize,
    rejects: Vec<Item>,
    nested: Vec<String>,
}

fn load(path: &Path, opts: &MapOptions) -> Result<Loaded> {
    let (source, rows) = open_rows(path, &opts.read)?;
    if matches!(source.kind, InputKind::Csv | InputKind::Tsv) {
        return load_delimited(source, rows);
    }
    let mut rows = rows;
    let (mut ok, mut rejects) = (vec![], vec![]);
    loop {
        // Raw rows a batch at a time, parsed in parallel: the raw bytes never all wait at once.
        let raws = rows.by_ref().take(BATCH_ROWS).collect::<Result<Vec<_>>>()?;
        if raws.is_empty() {
            break;
        }
        let parsed: Vec<(u64, Result<Map<String, Value>, _>)> =
            raws.into_par_iter().map(|raw| (raw.row, to_object(&source, raw))).collect();
        for (row, p) in parsed {
            match p {
                Ok(m) => ok.push((row, m)),
                Err(r) => rejects.push(Item::Rejected(r)),
            }
        }
    }
    let mut nested: Vec<String> = vec![];
    for (_, m) in &ok {
        for (k, v) in m {
            if (v.is_array() || v.is_object()) && !nested.contains(k) {
                nested.push(k.clone());
            }
        }
    }
    let table = table(&mut ok).with_context(|| format!("{}: cannot make a table of its rows", path.display()))?;
    Ok(Loaded { source, table, rows: ok.len(), rejects, nested })
}

/// A CSV/TSV input straight into text columns, no object per row (its fields are text already):
/// each record's fields checked as UTF-8 (a row that is not is rejected, as on the streaming path)
/// and appended to its column; empty fields are nulls.
fn load_delimited(source: Source, rows: super::read::RowIter) -> Result<Loaded> {
    let headers = source.csv_headers.clone().context("a CSV source has its header")?;
    let mut cols: Vec<StringChunkedBuilder> =
        headers.iter().map(|h| StringChunkedBuilder::new(h.as_str().into(), 1 << 16)).collect();
    let (mut ids, mut rejects) = (vec![], vec![]);
    for raw in rows {
        let raw = raw?;
        let RawData::Csv(rec) = &raw.data else {
            // Malformed records arrive as rejects already.
            if let Err(r) = to_object(&source, raw) {
                rejects.push(Item::Rejected(r));
            }
            continue;
        };
        // Each field checked once; the row goes in only when all of them are text.
        let fields: Result<Vec<&str>, _> =
            headers.iter().zip(rec.iter()).map(|(h, f)| std::str::from_utf8(f).map_err(|e| (h, e))).collect();
        let fields = match fields {
            Ok(f) => f,
            Err((h, e)) => {
                let r = reject(&source, raw.row, raw.line, Some(h), reason::INVALID_UTF8, utf8_detail(e));
                rejects.push(Item::Rejected(r));
                continue;
            }
        };
        for (b, f) in cols.iter_mut().zip(fields) {
            match f {
                "" => b.append_null(),
                s => b.append_value(s),
            }
        }
        ids.push(raw.row as i64);
    }
    let n = ids.len();
    let mut table = vec![Column::new(ROW.into(), ids)];
    table.extend(cols.into_par_iter().map(|b| typed_text(b.finish())).collect::<Vec<_>>());
    Ok(Loaded { source, table: DataFrame::new(n, table)?, rows: n, rejects, nested: vec![] })
}

/// A text column as numbers when every value is exactly a number's text (as [`table`] says).
fn typed_text(ca: StringChunked) -> Column {
    let name = ca.name().clone();
    let ints: Option<Vec<Option<i64>>> = ca.iter().map(|v| v.map_or(Some(None), |s| int_text(s).map(Some))).collect();
    if let Some(ints) = ints {
        return Column::new(name, ints);
    }
    let floats: Option<Vec<Option<f64>>> =
        ca.iter().map(|v| v.map_or(Some(None), |s| float_text(s).map(Some))).collect();
    if let Some(floats) = floats {
        return Column::new(name, floats);
    }
    ca.into_column()
}

/// A table of text columns (lists and objects as their JSON), in the order columns first appear,
/// with the row numbers in [`ROW`]. A column whose every value is a number, or text that reads back
/// as exactly that number ("40", not "040" or "2.50"), is a number column, so `WHERE score > 3`
/// compares numbers and the text comes out as it went in.
/// The rows' values move into the table column by column (the rows are left empty), so the text is
/// held twice for one column at most, not for the whole file.
fn table(rows: &mut [(u64, Map<String, Value>)]) -> Result<DataFrame> {
    let mut names: Vec<String> = vec![];
    for (_, m) in rows.iter() {
        for k in m.keys() {
            if !names.contains(k) {
                names.push(k.clone());
            }
        }
    }
    let mut cols = vec![Column::new(ROW.into(), rows.iter().map(|(r, _)| *r as i64).collect::<Vec<_>>())];
    for name in &names {
        let vals: Vec<Option<Value>> = rows
            .par_iter_mut()
            .map(|(_, m)| m.shift_remove(name.as_str()).filter(|v| !v.is_null() && v.as_str() != Some("")))
            .collect();
        cols.push(column(name, &vals));
    }
    Ok(DataFrame::new(rows.len(), cols)?)
}

/// One column of the table, typed as [`table`] says.
fn column(name: &str, vals: &[Option<Value>]) -> Column {
    let vals: Vec<Option<&Value>> = vals.iter().map(Option::as_ref).collect();
    if let Some(ints) = all(&vals, as_int) {
        return Column::new(name.into(), ints);
    }
    if let Some(floats) = all(&vals, as_float) {
        return Column::new(name.into(), floats);
    }
    let json: Vec<Option<String>> = vals.iter().map(|v| v.filter(|v| !v.is_string()).map(|v| v.to_string())).collect();
    let text: Vec<Option<&str>> =
        vals.iter().zip(&json).map(|(v, j)| v.and_then(Value::as_str).or(j.as_deref())).collect();
    Column::new(name.into(), text)
}

/// The column as type T when each present value reads as one (None otherwise).
fn all<T>(vals: &[Option<&Value>], f: fn(&Value) -> Option<T>) -> Option<Vec<Option<T>>> {
    vals.iter().map(|v| v.map_or(Some(None), |x| f(x).map(Some))).collect()
}

/// A value as an integer: a JSON integer, or text that is exactly one's decimal form.
fn as_int(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => int_text(s),
        _ => None,
    }
}

/// Text that is exactly an integer's decimal form.
fn int_text(s: &str) -> Option<i64> {
    s.parse::<i64>().ok().filter(|i| i.to_string() == s)
}

/// Text that is exactly a float's shortest decimal form.
fn float_text(s: &str) -> Option<f64> {
    s.parse::<f64>().ok().filter(|f| f.is_finite() && f.to_string() == s)
}

/// A value as a float: a JSON number, or text that is exactly one's shortest decimal form.
fn as_float(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => float_text(s),
        _ => None,
    }
}

/// A result row: its record number (when the query kept [`ROW`]) and its values.
type ResultRow = (Option<u64>, Map<String, Value>);

/// A result row back as an object: text columns as strings, numbers as numbers, a column that
/// held JSON lists or objects in its input parsed back; with its record number when the result kept
/// [`ROW`].
fn rows_of(df: &DataFrame, nested: &[String]) -> Result<Vec<ResultRow>> {
    enum Typed {
        Int(polars::prelude::Int64Chunked),
        Float(polars::prelude::Float64Chunked),
        Text(polars::prelude::StringChunked, bool),
    }
    let mut row_col = None;
    let mut cols = vec![];
    for col in df.columns() {
        let name = col.name().to_string();
        let s = col.as_materialized_series();
        let typed = match s.dtype() {
            _ if name == ROW => {
                row_col = Some(s.cast(&DataType::Int64)?.rechunk().i64()?.clone());
                continue;
            }
            DataType::Int64 | DataType::Int32 | DataType::UInt32 | DataType::UInt64 => {
                Typed::Int(s.cast(&DataType::Int64)?.rechunk().i64()?.clone())
            }
            DataType::Float64 | DataType::Float32 => Typed::Float(s.cast(&DataType::Float64)?.rechunk().f64()?.clone()),
            _ => Typed::Text(s.cast(&DataType::String)?.rechunk().str()?.clone(), nested.contains(&name)),
        };
        cols.push((name, typed));
    }
    Ok((0..df.height())
        .into_par_iter()
        .map(|i| {
            let mut m = Map::with_capacity(cols.len());
            for (name, c) in &cols {
                let v = match c {
                    Typed::Int(a) => a.get(i).map(Value::from),
                    Typed::Float(a) => a.get(i).and_then(serde_json::Number::from_f64).map(Value::Number),
                    Typed::Text(a, json) => a.get(i).map(|x| match json {
                        true => serde_json::from_str(x).unwrap_or_else(|_| Value::String(x.to_string())),
                        false => Value::String(x.to_string()),
                    }),
                };
                if let Some(v) = v {
                    m.insert(name.clone(), v);
                }
            }
            (row_col.as_ref().and_then(|r| r.get(i)).map(|r| r as u64), m)
        })
        .collect())
}

/// The table name of an input: its file stem, made a plain SQL identifier.
fn table_name(path: &Path) -> String {
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let stem = name.split('.').next().unwrap_or("data");
    let id: String = stem.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
    if id.is_empty() || id.starts_with(|c: char| c.is_ascii_digit()) {
        format!("t_{id}")
    } else {
        id
    }
}

/// The rows `--limit` / `--sample` keep of `n`, in order.
fn selected(n: usize, sel: &Selection) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    if let Some(k) = sel.sample.filter(|&k| k < n) {
        SplitMix64::new(sel.seed ^ 0x5A4D_91E5).shuffle(&mut idx);
        idx.truncate(k);
        idx.sort_unstable();
    }
    if let Some(l) = sel.limit {
        idx.truncate(l);
    }
    idx
}

/// The table path of [`super::stream_conversations`]: every input read, the query run, the kept
/// rows mapped and handed to `on_batch` in batches, then the filtered count.
pub fn select_conversations(
    inputs: &[PathBuf],
    opts: &MapOptions,
    sel: &Selection,
    on_batch: &mut dyn FnMut(Batch) -> Result<()>,
) -> Result<()> {
    let ctx = polars::sql::SQLContext::new();
    let mut names = vec![];
    let mut nested: Vec<String> = vec![];
    let mut rows_in = 0usize;
    let mut first: Option<Arc<str>> = None;
    for path in inputs {
        let mut loaded = load(path, opts)?;
        let name = if inputs.len() == 1 { "data".to_string() } else { table_name(path) };
        if names.contains(&name) {
            bail!("two inputs make the table {name:?} (tables are named by file stem); rename one of the files");
        }
        rows_in += loaded.rows;
        for k in loaded.nested.drain(..) {
            if !nested.contains(&k) {
                nested.push(k);
            }
        }
        let src = loaded.source.name.clone();
        first.get_or_insert(src.clone());
        let rejects = std::mem::take(&mut loaded.rejects);
        if !rejects.is_empty() {
            on_batch(Batch { index: 0, source: src, format: None, label: None, read_notes: None, items: rejects })?;
        }
        ctx.register(&name, loaded.table.lazy());
        names.push(name);
    }
    if sel.sql.is_none() && inputs.len() > 1 {
        bail!("--limit and --sample over several inputs need a --sql query that says how to combine their tables");
    }
    let mut ctx = ctx;
    let result = match &sel.sql {
        Some(q) => ctx
            .execute(q)
            .and_then(|lf| lf.collect())
            .with_context(|| format!("--sql: the query failed; its tables are: {}", names.join(", ")))?,
        None => ctx.execute(&format!("SELECT * FROM {}", names[0])).and_then(|lf| lf.collect())?,
    };
    let rows = rows_of(&result, &nested)?;
    let keep = selected(rows.len(), sel);
    // One input: rows keep its name (and, when the query keeps the hidden row column, their ids).
    let source: Arc<str> = match &first {
        Some(f) if inputs.len() == 1 => f.clone(),
        _ => Arc::from("sql"),
    };
    let columns: Vec<String> = result.get_column_names().iter().map(|c| c.to_string()).filter(|c| c != ROW).collect();
    let mapper = Mapper::new(opts, &columns, &source)?;
    let label = Some(mapper.label());
    let mut kept = 0usize;
    let mut rows = rows.into_iter().map(Some).collect::<Vec<_>>();
    for chunk in keep.chunks(BATCH_ROWS) {
        let taken: Vec<ResultRow> = chunk.iter().map(|&i| rows[i].take().expect("each row taken once")).collect();
        let items: Vec<Item> = taken
            .into_par_iter()
            .enumerate()
            .map(|(j, (row, obj))| {
                let n = row.unwrap_or((kept + j + 1) as u64);
                let ctx = RowCtx { source: &source, row: n, line: None };
                Item::mapped(&mapper, opts, obj, &ctx)
            })
            .collect();
        kept += items.len();
        on_batch(Batch {
            index: 0,
            source: source.clone(),
            format: Some(mapper.format),
            label: label.clone(),
            read_notes: None,
            items,
        })?;
    }
    let filtered = rows_in.saturating_sub(kept);
    if filtered > 0 {
        let items = (0..filtered).map(|_| Item::Filtered).collect();
        on_batch(Batch {
            index: 0,
            source: source.clone(),
            format: Some(mapper.format),
            label,
            read_notes: None,
            items,
        })?;
    }
    Ok(())
}
