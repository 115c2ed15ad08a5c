//! Packing samples into training rows ([`bfd`], [`rows`]) and the Parquet files tunekit writes
//! ([`shards`] for training data, [`conversations_parquet`] for conversation tables).

pub mod bfd;
pub mod conversations_parquet;
pub mod preference;
pub mod rows;
pub mod shards;
