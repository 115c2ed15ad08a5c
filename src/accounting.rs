//! Nothing lost: rejected rows with their reasons, and the counts that must add up.
//!
//! Every stage reports `rows_read = kept + duplicates + filtered + contaminated + rejected`; rejects
//! go to a `rejects.jsonl` beside the output with the source file, row, line, field and reason, and
//! rows overlapping an evaluation set to `contaminated.jsonl` with what they overlap. [`Tally`]
//! is the part of every command's summary that says where its rows went.

use crate::output::AtomicFile;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A reason or other code read back from a file (a rank's part), as the `&'static str` the code
/// uses: each distinct name is kept once for the life of the process.
pub fn intern(name: &str) -> &'static str {
    static NAMES: std::sync::Mutex<std::collections::BTreeSet<&'static str>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut names = NAMES.lock().expect("the interned names are never poisoned");
    match names.get(name) {
        Some(n) => n,
        None => {
            let n: &'static str = Box::leak(name.to_string().into_boxed_str());
            names.insert(n);
            n
        }
    }
}

/// Why a row was rejected. The code is stable (used in summaries); the detail is for people.
#[derive(Debug, Clone, Serialize)]
pub struct Reject {
    pub source: String,
    /// 1-based record number within the source (data row for CSV, line for JSONL, element for JSON).
    pub row: u64,
    /// 1-based physical line where the record starts, when the format has lines.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub reason: &'static str,
    pub detail: String,
}

/// A [`Reject`] as read back from a file.
#[derive(Deserialize)]
struct RejectRecord {
    source: String,
    row: u64,
    line: Option<u64>,
    field: Option<String>,
    reason: String,
    detail: String,
}

impl<'de> Deserialize<'de> for Reject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Reject, D::Error> {
        let RejectRecord { source, row, line, field, reason, detail } = RejectRecord::deserialize(d)?;
        Ok(Reject { source, row, line, field, reason: intern(&reason), detail })
    }
}

impl Reject {
    /// A reject for a conversation found bad after it was read (chat template, token limits):
    /// the source and row come back out of its `<source>:<row>` id.
    pub fn for_conversation(c: &crate::record::Conversation, reason: &'static str, detail: String) -> Reject {
        let (source, row) = match c.id.rsplit_once(':').map(|(s, r)| (s, r.parse::<u64>())) {
            Some((s, Ok(r))) => (s.to_string(), r),
            _ => (c.id.clone(), 0),
        };
        Reject { source, row, line: None, field: None, reason, detail }
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} row {}", self.source, self.row)?;
        if let Some(l) = self.line {
            write!(f, " (line {l})")?;
        }
        if let Some(field) = &self.field {
            write!(f, ", field '{field}'")?;
        }
        write!(f, ": {} ({})", self.detail, self.reason)
    }
}

/// Where a row came from, to build its rejects and its id.
pub struct RowCtx<'a> {
    pub source: &'a str,
    pub row: u64,
    pub line: Option<u64>,
}

impl RowCtx<'_> {
    pub fn reject(&self, field: Option<&str>, reason: &'static str, detail: impl Into<String>) -> Reject {
        Reject {
            source: self.source.to_string(),
            row: self.row,
            line: self.line,
            field: field.map(str::to_string),
            reason,
            detail: detail.into(),
        }
    }
    /// The canonical record id, `<source>:<row>`.
    pub fn id(&self) -> String {
        format!("{}:{}", self.source, self.row)
    }
}

/// Reject reason codes, shared by all stages.
pub mod reason {
    pub const MALFORMED_CSV: &str = "malformed_csv";
    pub const WRONG_FIELD_COUNT: &str = "wrong_field_count";
    pub const INVALID_UTF8: &str = "invalid_utf8";
    pub const INVALID_JSON: &str = "invalid_json";
    pub const NOT_AN_OBJECT: &str = "not_an_object";
    pub const MISSING_FIELD: &str = "missing_field";
    pub const EMPTY_FIELD: &str = "empty_field";
    pub const WRONG_TYPE: &str = "wrong_type";
    pub const TEMPLATE_ERROR: &str = "template_error";
    pub const BAD_ROLE: &str = "bad_role";
    pub const NO_ASSISTANT: &str = "no_assistant_message";
    pub const CHAT_TEMPLATE_ERROR: &str = "chat_template_error";
    pub const EMPTY_LOSS_MASK: &str = "empty_loss_mask";
    pub const MASK_SPAN_NOT_FOUND: &str = "mask_span_not_found";
    pub const TOO_LONG: &str = "too_long";
    pub const PROMPT_TOO_LONG: &str = "prompt_too_long";
    pub const OVER_TOKEN_LIMIT: &str = "over_token_limit";
    pub const NOT_PREFERENCE: &str = "not_a_preference_pair";
    pub const NOT_LABELLED: &str = "not_labelled";
    pub const NO_USER: &str = "no_user_message";
}

/// Counts of one run. `read == kept + rejected + filtered + contaminated + duplicates` (+ too-long
/// drops where they apply).
#[derive(Debug, Default, Clone, Serialize)]
pub struct Counts {
    pub rows_read: u64,
    pub rows_kept: u64,
    pub rejected: u64,
    pub rejected_by_reason: BTreeMap<String, u64>,
    pub duplicates_exact: u64,
    pub duplicates_near: u64,
    /// Rows a `--sql` query, `--limit` or `--sample` left out.
    #[serde(skip_serializing_if = "is_zero")]
    pub filtered: u64,
    /// Rows that overlap an evaluation set of `--decontaminate` (in contaminated.jsonl).
    #[serde(skip_serializing_if = "is_zero")]
    pub contaminated: u64,
    /// Rows kept per source (the `<source>` of each kept row's `<source>:<row>` id).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub kept_by_source: BTreeMap<String, u64>,
    /// The first reject of each reason, as it reads (for the message of a run that keeps nothing).
    #[serde(skip)]
    pub examples: BTreeMap<String, String>,
}

impl Counts {
    /// One row kept, counted under the source its id names.
    pub fn keep(&mut self, id: &str) {
        self.rows_kept += 1;
        let source = id.rsplit_once(':').map_or(id, |(s, _)| s);
        match self.kept_by_source.get_mut(source) {
            Some(n) => *n += 1,
            None => {
                self.kept_by_source.insert(source.to_string(), 1);
            }
        }
    }

    pub fn reject(&mut self, r: &Reject) {
        self.rejected += 1;
        *self.rejected_by_reason.entry(r.reason.to_string()).or_default() += 1;
        if !self.examples.contains_key(r.reason) {
            self.examples.insert(r.reason.to_string(), r.to_string());
        }
    }

    /// The `n` most common reject reasons with their counts and first example, one per line.
    pub fn top_reasons(&self, n: usize) -> Vec<String> {
        let mut by: Vec<(&String, &u64)> = self.rejected_by_reason.iter().collect();
        by.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        by.into_iter()
            .take(n)
            .map(|(reason, k)| match self.examples.get(reason) {
                Some(e) => format!("{reason}: {k} (e.g. {e})"),
                None => format!("{reason}: {k}"),
            })
            .collect()
    }
    /// The invariant every stage keeps.
    pub fn balanced(&self) -> bool {
        self.kept_by_source.values().sum::<u64>() == self.rows_kept
            && self.rows_read
                == self.rows_kept
                    + self.rejected
                    + self.filtered
                    + self.contaminated
                    + self.duplicates_exact
                    + self.duplicates_near
    }
}

/// Where a command's rows went, how long it took and the files that say why rows were dropped: the
/// header of every row-reading command's summary (flattened into its JSON).
#[derive(Debug, Clone, Serialize)]
pub struct Tally {
    #[serde(flatten)]
    pub counts: Counts,
    #[serde(flatten)]
    pub files: SideFiles,
    pub seconds: f64,
    pub rows_per_s: f64,
}

impl Tally {
    /// The tally of a run that started at `start`, with the side files it wrote.
    pub fn new(counts: Counts, files: SideFiles, start: Instant) -> Tally {
        let seconds = start.elapsed().as_secs_f64();
        Tally { rows_per_s: counts.rows_read as f64 / seconds.max(1e-9), counts, files, seconds }
    }

    /// A run that keeps no row is an error (exit 1) that says where the rows went and why, with the
    /// most common reject reasons and an example of each; more than half rejected is a warning.
    pub fn verdict(&self, command: &str) -> anyhow::Result<()> {
        let c = &self.counts;
        let files = || {
            [&self.files.rejects, &self.files.duplicates, &self.files.contaminated]
                .into_iter()
                .flatten()
                .map(|f| format!("\n  see {f}"))
                .collect::<String>()
        };
        if c.rows_kept == 0 {
            if c.rows_read == 0 {
                anyhow::bail!("{command} kept no rows: the input has none");
            }
            let mut msg = format!(
                "{command} kept none of the {} row(s) read: {} rejected, {} filtered, {} contaminated, {} duplicate(s)",
                c.rows_read,
                c.rejected,
                c.filtered,
                c.contaminated,
                c.duplicates_exact + c.duplicates_near
            );
            let top = c.top_reasons(3);
            if !top.is_empty() {
                msg.push_str("\nmost common reasons:");
                for t in top {
                    msg.push_str(&format!("\n  {t}"));
                }
            }
            msg.push_str(&files());
            anyhow::bail!(msg);
        }
        if c.rejected * 2 > c.rows_read {
            let top = c.top_reasons(1).into_iter().next().unwrap_or_default();
            crate::progress::warn(&format!(
                "{command} rejected {} of {} rows (more than half); most common: {top}{}",
                c.rejected,
                c.rows_read,
                files()
            ));
        }
        Ok(())
    }

    /// "N row(s) in S s (R rows/s)", for a command's first line.
    pub fn rate(&self) -> String {
        format!("{} row(s) in {:.2}s ({:.0} rows/s)", self.counts.rows_read, self.seconds, self.rows_per_s)
    }

    /// The lines on duplicates and rejects, with their reasons and files.
    pub fn print_human(&self) {
        let c = &self.counts;
        if c.filtered > 0 {
            println!("  filtered:   {} (left out by --sql, --limit or --sample)", c.filtered);
        }
        if c.contaminated > 0 {
            println!("  contaminated: {} (overlap an evaluation set of --decontaminate)", c.contaminated);
        }
        if c.duplicates_exact + c.duplicates_near > 0 {
            println!("  duplicates: {} exact, {} near", c.duplicates_exact, c.duplicates_near);
        }
        println!("  rejected:   {}", c.rejected);
        for (r, n) in &c.rejected_by_reason {
            println!("    {r}: {n}");
        }
        if let Some(f) = &self.files.rejects {
            println!("  rejects:    {f}");
        }
        if let Some(f) = &self.files.duplicates {
            println!("  duplicates: {f}");
        }
        if let Some(f) = &self.files.contaminated {
            println!("  contaminated: {f}");
        }
    }
}

/// A JSONL side file beside an output (`rejects.jsonl`, `contaminated.jsonl`): written atomically,
/// created only when its first record comes, and a stale one from an earlier run removed when none
/// does.
pub struct SideFile {
    path: PathBuf,
    file: Option<AtomicFile>,
    pub count: u64,
}

impl SideFile {
    pub fn new(path: PathBuf) -> Self {
        SideFile { path, file: None, count: 0 }
    }
    /// `name` next to `out` (a file output; a directory output keeps its side files inside).
    pub fn beside(out: &Path, name: &str) -> Self {
        let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        Self::new(dir.join(name))
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn write<T: Serialize>(&mut self, record: &T) -> anyhow::Result<()> {
        if self.file.is_none() {
            self.file = Some(AtomicFile::create(&self.path)?);
        }
        let f = self.file.as_mut().expect("just created");
        serde_json::to_writer(&mut *f, record)?;
        f.write_all(b"\n")?;
        self.count += 1;
        Ok(())
    }
    /// Commits the file and returns its path; without records, removes an earlier run's file.
    pub fn finish(self) -> anyhow::Result<Option<String>> {
        match self.file {
            Some(f) => {
                f.commit()?;
                Ok(Some(self.path.display().to_string()))
            }
            None => {
                let _ = std::fs::remove_file(&self.path);
                Ok(None)
            }
        }
    }
}

/// The side files a run wrote, each when it had something to say.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SideFiles {
    #[serde(rename = "rejects_file")]
    pub rejects: Option<String>,
    #[serde(rename = "duplicates_file")]
    pub duplicates: Option<String>,
    #[serde(rename = "contaminated_file", skip_serializing_if = "Option::is_none")]
    pub contaminated: Option<String>,
}

/// For `skip_serializing_if`: counts that are zero are left out of summaries and manifests.
pub(crate) fn is_zero(n: &u64) -> bool {
    *n == 0
}
