//! Ingest: raw files to canonical conversations.
//!
//! [`read`] splits files into raw rows (sequential, cheap); [`rows`] parses a raw row into a JSON
//! object; [`formats`] maps an object to a [`crate::record::Conversation`] (parallel), one file per
//! dataset format, as the [`options`] say; the quality filters judge it, and it leaves as an
//! [`item::Item`] in a [`item::Batch`]. The [`stream`] function ties them together: batches of
//! conversations or rejects, in input order; with `--sql`, `--limit` or `--sample` the [`table`]
//! path reads the inputs whole into polars tables and queries them first.

pub mod formats;
pub mod item;
pub mod options;
pub mod read;
pub mod rows;
pub mod stream;
pub mod table;

pub use formats::Mapper;
pub use item::{Batch, Item};
pub use options::{Format, MapOptions, Selection};
pub use stream::stream_conversations;
