//! What ingest hands on: each row as an [`Item`] (a conversation, or why it is not one: rejected,
//! filtered out by a selection, contaminated), in [`Batch`]es of input order.

use super::formats::Mapper;
use super::options::{Format, MapOptions};
use crate::accounting::{Reject, RowCtx};
use crate::quality::Verdict;
use crate::record::Conversation;
use serde_json::{Map, Value};

/// Rows a batch holds (the last of a file may hold fewer).
pub const BATCH_ROWS: usize = 4096;

// Rows move by value in batches; boxing the larger variant would cost an allocation per row.
#[allow(clippy::large_enum_variant)]
pub enum Item {
    Ok(Conversation),
    Rejected(Reject),
    /// A row a `--sql` query, `--limit` or `--sample` left out.
    Filtered,
    /// A row overlapping an evaluation set of `--decontaminate` (rare: boxed).
    Contaminated(Box<crate::quality::decontaminate::Contamination>),
}

impl Item {
    /// The conversation of a row that was read and mapped.
    pub fn conversation(&self) -> Option<&Conversation> {
        match self {
            Item::Ok(c) => Some(c),
            _ => None,
        }
    }
}

pub struct Batch {
    /// The batch's place among all batches of all inputs (a sharded run deals them to its ranks).
    pub index: u64,
    pub source: std::sync::Arc<str>,
    pub format: Option<Format>,
    /// The format as summaries show it (with a synonym mapping when `--format auto` chose one).
    pub label: Option<String>,
    /// How the file was read when it was not plain UTF-8 with its extension's delimiter: "delimiter
    /// ';'", "encoding windows-1252".
    pub read_notes: Option<String>,
    pub items: Vec<Item>,
}

impl Item {
    /// Row `ctx` mapped by `mapper` and judged by the options' quality filters.
    pub fn mapped(mapper: &Mapper, opts: &MapOptions, row: Map<String, Value>, ctx: &RowCtx) -> Item {
        match mapper.map(row, ctx) {
            Err(r) => Item::Rejected(r),
            Ok(conv) => match opts.quality.verdict(conv, ctx, !opts.prompts) {
                Verdict::Keep(c) => Item::Ok(c),
                Verdict::Rejected(r) => Item::Rejected(r),
                Verdict::Contaminated(c) => Item::Contaminated(c),
            },
        }
    }
}
