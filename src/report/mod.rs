//! What tunekit shows people about data and runs: charts ([`plot`]), summary statistics
//! ([`stats`]) and TensorBoard event files ([`tensorboard`]).

pub mod plot;
pub mod stats;
pub mod tensorboard;
