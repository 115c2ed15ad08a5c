//! What tunekit shows people about data and runs: SVG charts ([`charts`]) in an HTML report
//! ([`html`]), PNG plots ([`plot`]), summary statistics
//! ([`stats`]) and TensorBoard event files ([`tensorboard`]).

pub mod charts;
pub mod html;
pub mod plot;
pub mod stats;
pub mod tensorboard;
