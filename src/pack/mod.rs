//! Samples into training shards: packing whole samples into rows ([`bfd`], [`rows`]) a window of a
//! split at a time ([`split_packer`]), fitting over-long samples ([`fit`]), the Parquet shard files of SFT rows ([`shards`]), of preference
//! pairs ([`preference`]) and of RL prompts ([`prompts`]), and the directory's [`manifest`], written
//! last.

pub mod bfd;
pub mod fit;
pub mod manifest;
pub mod preference;
pub mod prompts;
pub mod rows;
pub mod shards;
pub mod split_packer;
