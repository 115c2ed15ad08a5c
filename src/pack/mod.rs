//! Samples into training shards: packing whole samples into rows ([`bfd`], [`rows`]), fitting
//! over-long samples ([`fit`]), the Parquet shard files of SFT rows ([`shards`]) and of preference
//! pairs ([`preference`]), and the directory's [`manifest`], written last.

pub mod bfd;
pub mod fit;
pub mod manifest;
pub mod preference;
pub mod rows;
pub mod shards;
