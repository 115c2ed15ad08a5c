//! Held-out answers of the user's own data (`bench --held-out SHARDS`): each conversation in the
//! eval split of a shard directory becomes a generation document. Its tokens up to its last trained
//! answer are the prompt, exactly as `prepare` rendered them with the model's chat template (nothing
//! to re-specify); that answer, decoded with special tokens skipped, is the reference. Answers are
//! generated greedily up to an end-of-turn token and scored by exact match, token F1 and ROUGE-L.

use super::task::{Doc, Task};
use crate::tokenize::TokenizerInfo;
use crate::train::data::Shards;
use anyhow::{anyhow, bail, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// The metrics a held-out answer is scored by.
pub const METRICS: &[&str] = &["exact_match", "f1", "rougeL"];

/// The prompt and answer of a conversation: the segment's tokens before its last run of trained
/// labels, and that run. None when nothing in the segment is trained.
pub fn last_answer(input_ids: &[i32], labels: &[i32]) -> Option<(Vec<u32>, Vec<u32>)> {
    let end = labels.iter().rposition(|&l| l != -100)? + 1;
    let start = labels[..end].iter().rposition(|&l| l == -100).map_or(0, |i| i + 1);
    if start == 0 {
        return None; // no prompt to answer
    }
    let ids = |r: &[i32]| r.iter().map(|&t| t as u32).collect();
    Some((ids(&input_ids[..start]), ids(&input_ids[start..end])))
}

/// The held-out task of a shard directory.
pub fn task(dir: &Path, tok: &TokenizerInfo, max_new_tokens: usize) -> Result<Task> {
    let shards = Shards::load(dir, "eval")?;
    if shards.rows.is_empty() {
        bail!(
            "--held-out {}: no eval split (eval-*.parquet) to take held-out answers from; prepare the data with \
             --eval-fraction (e.g. 0.1)",
            dir.display()
        );
    }
    let decode = |ids: &[u32], skip: bool| tok.tokenizer.decode(ids, skip).map_err(|e| anyhow!("decode: {e}"));
    let (mut prompts, mut docs, mut skipped) = (vec![], vec![], 0usize);
    for (r, row) in shards.rows.iter().enumerate() {
        let mut at = 0usize;
        for &len in &row.seq_lengths {
            let seg = at..at + len as usize;
            at += len as usize;
            let Some((prompt, answer)) = last_answer(&row.input_ids[seg.clone()], &row.labels[seg]) else {
                skipped += 1;
                continue;
            };
            let mut fields = Map::new();
            fields.insert("context".into(), Value::String(decode(&prompt, false)?));
            fields.insert("reference".into(), Value::String(decode(&answer, true)?));
            docs.push(Doc { fields, source: format!("{} eval", dir.display()), row: r as u64 + 1, line: None });
            prompts.push(prompt);
        }
    }
    if docs.is_empty() {
        bail!("--held-out {}: no conversation in the eval split has an answer after a prompt", dir.display());
    }
    if skipped > 0 {
        eprintln!(
            "note: --held-out {}: {skipped} conversation(s) without a trained answer after a prompt skipped",
            dir.display()
        );
    }
    Ok(Task::from_prompts("held-out", dir, prompts, docs, METRICS, max_new_tokens))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_trained_run_is_the_answer_and_everything_before_it_the_prompt() {
        let ids = [1, 2, 3, 4, 5, 6, 7, 8];
        let labels = [-100, -100, 3, -100, -100, 6, 7, -100];
        let (p, a) = last_answer(&ids, &labels).unwrap();
        assert_eq!(p, vec![1, 2, 3, 4, 5]);
        assert_eq!(a, vec![6, 7]);
        assert!(last_answer(&ids, &[-100; 8]).is_none());
        assert!(last_answer(&[1, 2], &[1, 2]).is_none());
    }
}
