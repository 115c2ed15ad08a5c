//! Ingest: raw files to canonical conversations.
//!
//! [`read`] splits files into raw rows (sequential, cheap); [`rows`] parses a raw row into a JSON
//! object; [`formats`] maps an object to a [`crate::record::Conversation`] (parallel). The
//! [`stream`] function ties them together: batches of conversations or rejects, in input order;
//! with `--sql`, `--limit` or `--sample` the [`table`] path reads the inputs whole into polars
//! tables and queries them first.

pub mod formats;
pub mod read;
pub mod rows;
pub mod stream;
pub mod table;

pub use formats::{Format, MapOptions, Mapper};
pub use stream::{stream_conversations, Batch, Item};
