//! What tunekit shows people about data and runs: charts as SVG and PNG ([`charts`]), an HTML
//! report ([`html`]; [`bench`]: a run's benchmark results), summary statistics ([`stats`]) and TensorBoard event files ([`tensorboard`]).

pub mod bench;
pub mod charts;
pub mod html;
pub mod stats;
pub mod tensorboard;
