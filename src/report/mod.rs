//! What tunekit shows people about data and runs: charts ([`plot`]) and summary statistics
//! ([`stats`]).

pub mod plot;
pub mod stats;
