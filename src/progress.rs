//! Progress bars (indicatif, on stderr, hidden with `-q` or when stderr is not a terminal) and
//! warnings.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::sync::atomic::{AtomicBool, Ordering};

static QUIET: AtomicBool = AtomicBool::new(false);

pub fn set_quiet(q: bool) {
    QUIET.store(q, Ordering::Relaxed);
}

pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// A counter of rows with a rate, for streams of unknown length.
pub fn rows(what: &str) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    if quiet() {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    pb.set_style(
        ProgressStyle::with_template("{spinner} {prefix} {human_pos} rows ({per_sec}) {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb.set_prefix(what.to_string());
    pb
}

/// A bar for work of known length.
pub fn bar(what: &str, len: u64) -> ProgressBar {
    let pb = ProgressBar::new(len);
    if quiet() {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    pb.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {human_pos}/{human_len} ({per_sec}, eta {eta}) {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_prefix(what.to_string());
    pb
}

/// A line of information on stderr (not under --quiet).
pub fn note(msg: &str) {
    if !quiet() {
        eprintln!("{msg}");
    }
}

pub fn warn(msg: &str) {
    if !quiet() {
        eprintln!("warning: {msg}");
    }
}
