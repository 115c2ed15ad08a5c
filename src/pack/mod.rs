//! Samples into training shards: packing whole samples into rows ([`bfd`], [`rows`]) a window of a
//! split at a time ([`split_packer`]), fitting over-long samples ([`fit`]), the Parquet shard files of SFT rows ([`shards`]), of preference
//! pairs ([`preference`]), of labelled unpaired rows ([`unpaired`]) and of RL prompts ([`prompts`]) (the single-file splits' writer in [`single_file`]), and the directory's [`manifest`], written
//! last.

pub mod bfd;
pub mod fit;
pub mod manifest;
pub mod preference;
pub mod prompts;
pub mod rows;
pub mod shards;
pub mod single_file;
pub mod split_packer;
pub mod unpaired;
