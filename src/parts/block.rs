//! One batch of a rank's share as its part records it: each row's outcome in input order, with
//! what the sequential half needs to decide on it without re-reading or re-tokenizing.

use crate::accounting::Reject;
use crate::dedup::Prepared;
use crate::ingest::Item;
use crate::quality::decontaminate::Contamination;
use crate::record::Conversation;
use crate::tokenize::mask::SampleError;
use crate::tokenize::Sample;
use serde::{Deserialize, Serialize};

/// A conversation's tokenized sample, or why it has none.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Tokenized {
    Sample { input_ids: Vec<u32>, labels: Vec<i32> },
    Failed { reason: String, detail: String },
}

impl Tokenized {
    pub fn of(r: Result<Sample, SampleError>) -> Tokenized {
        match r {
            Ok(s) => Tokenized::Sample { input_ids: s.input_ids, labels: s.labels },
            Err((reason, detail)) => Tokenized::Failed { reason: reason.to_string(), detail },
        }
    }

    pub fn into_result(self) -> Result<Sample, SampleError> {
        match self {
            Tokenized::Sample { input_ids, labels } => Ok(Sample { input_ids, labels }),
            Tokenized::Failed { reason, detail } => Err((crate::accounting::intern(&reason), detail)),
        }
    }
}

/// One row's outcome. Rows move by value once per batch (the same trade as `Item`'s).
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Row {
    Rejected(Reject),
    Filtered,
    Contaminated(Box<Contamination>),
    Read { conversation: Conversation, dedup: Option<Prepared>, tokenized: Option<Tokenized> },
}

/// Each conversation's duplicate check and tokenized sample (dedup's parts have no samples).
pub type Extra = (Option<Prepared>, Option<Tokenized>);

/// One batch: its global index and its rows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Block {
    pub index: u64,
    pub rows: Vec<Row>,
}

impl Block {
    /// The batch `items` with, for each conversation (in order), its duplicate check and sample.
    pub fn new(index: u64, items: Vec<Item>, mut prepared: Vec<Extra>) -> Block {
        prepared.reverse();
        let rows = items
            .into_iter()
            .map(|i| match i {
                Item::Ok(conversation) => {
                    let (dedup, tokenized) = prepared.pop().expect("one entry per conversation");
                    Row::Read { conversation, dedup, tokenized }
                }
                Item::Rejected(r) => Row::Rejected(r),
                Item::Filtered => Row::Filtered,
                Item::Contaminated(c) => Row::Contaminated(c),
            })
            .collect();
        Block { index, rows }
    }

    /// The batch as the front takes it: the items, and each conversation's duplicate check and sample.
    pub fn into_items(self) -> (Vec<Item>, Vec<Extra>) {
        let mut extra = vec![];
        let items = self
            .rows
            .into_iter()
            .map(|r| match r {
                Row::Read { conversation, dedup, tokenized } => {
                    extra.push((dedup, tokenized));
                    Item::Ok(conversation)
                }
                Row::Rejected(r) => Item::Rejected(r),
                Row::Filtered => Item::Filtered,
                Row::Contaminated(c) => Item::Contaminated(c),
            })
            .collect();
        (items, extra)
    }
}
