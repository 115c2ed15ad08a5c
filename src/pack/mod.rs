//! Packing samples into training rows and the Parquet files tunekit writes.

pub mod conversations_parquet;
