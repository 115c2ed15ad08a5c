//! Samples longer than a row: dropped (rejected as too long) or truncated to the row length, in which
//! case a sample left with nothing to train on is rejected too.

use crate::accounting::reason;
use crate::tokenize::Sample;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TooLong {
    /// Drop samples longer than --seq-len (written to rejects.jsonl as too_long).
    #[default]
    Drop,
    /// Keep the first --seq-len tokens.
    Truncate,
}

/// A sample that fits `seq_len`, and whether it was cut to fit; or the reject reason and detail.
pub fn fit(mut s: Sample, seq_len: usize, too_long: TooLong) -> Result<(Sample, bool), (&'static str, String)> {
    if s.len() <= seq_len {
        return Ok((s, false));
    }
    match too_long {
        TooLong::Drop => Err((
            reason::TOO_LONG,
            format!("{} tokens > --seq-len {seq_len} (use --too-long truncate to keep the start)", s.len()),
        )),
        TooLong::Truncate => {
            s.input_ids.truncate(seq_len);
            s.labels.truncate(seq_len);
            if s.trained() == 0 {
                return Err((
                    reason::PROMPT_TOO_LONG,
                    format!("the prompt alone fills --seq-len {seq_len}; nothing left to train on"),
                ));
            }
            Ok((s, true))
        }
    }
}
