//! Token ids back to text, with the trained spans (labels other than -100) marked: for inspecting
//! shards.

use super::TokenizerInfo;
use anyhow::Result;

/// Decodes tokens, marking trained runs: ANSI colour on a terminal, ⟦ ⟧ otherwise.
pub fn decode_marked(tok: &TokenizerInfo, ids: &[i32], labels: &[i32], colour: bool) -> Result<String> {
    let (open, close) = if colour { ("\x1b[42;30m", "\x1b[0m") } else { ("⟦", "⟧") };
    let mut out = String::new();
    let mut i = 0;
    while i < ids.len() {
        let trained = labels[i] != -100;
        let mut j = i;
        while j < ids.len() && (labels[j] != -100) == trained {
            j += 1;
        }
        let run: Vec<u32> = ids[i..j].iter().map(|&t| t as u32).collect();
        let text = tok.tokenizer.decode(&run, false).map_err(|e| anyhow::anyhow!("decode: {e}"))?;
        if trained {
            out.push_str(open);
            out.push_str(&text);
            out.push_str(close);
        } else {
            out.push_str(&text);
        }
        i = j;
    }
    Ok(out)
}
