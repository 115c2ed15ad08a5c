//! `prepare --method prompts`: prompts for online RL (GRPO, PPO). Each row is cut after its last user
//! turn and rendered with the chat template and its generation prompt (`add_generation_prompt`), as
//! `prompt_ids`; the row's other columns (a reference `answer`, say) are kept as string columns for
//! reward functions, and an assistant answer that followed the last user turn is kept as
//! `completion` when the row has no column of that name. Prompts longer than `--seq-len` are
//! rejected (counted, never cut). Dedup, split, accounting and manifest as for the other methods.

use super::{finish, hash_sources, joined, Made, PrepareMethod, PrepareOptions, PrepareSummary, Setup};
use crate::accounting::{reason, Reject};
use crate::admit::Front;
use crate::ingest::stream_conversations;
use crate::pack::manifest::{ManifestAccounting, ShardKind, SplitStats};
use crate::pack::prompts::{PromptRow, PromptWriter, COLUMNS};
use crate::record::Conversation;
use crate::split::is_eval;
use anyhow::Result;
use rayon::prelude::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Instant;

/// A conversation's prompt row, or the reject reason and detail.
type Prompted = Result<PromptRow, (&'static str, String)>;

/// The prompt of a conversation: rendered ids and the columns kept; or why it cannot be one.
fn prompt_row(c: &Conversation, setup: &Setup, opts: &PrepareOptions) -> Prompted {
    let Some(last_user) = c.messages.iter().rposition(|m| m.role == "user") else {
        return Err((reason::NO_USER, "the conversation has no user message to answer".into()));
    };
    let text = setup
        .template
        .render(&c.messages[..=last_user], c.tools.as_ref(), true)
        .map_err(|e| (reason::CHAT_TEMPLATE_ERROR, format!("chat template: {e:#}")))?;
    let enc = setup
        .tok
        .tokenizer
        .encode(text.as_str(), false)
        .map_err(|e| (reason::CHAT_TEMPLATE_ERROR, format!("tokenize: {e}")))?;
    let n = enc.get_ids().len();
    if n > opts.seq_len {
        return Err((
            reason::PROMPT_TOO_LONG,
            format!("the prompt is {n} tokens, more than --seq-len {}; it is skipped, not cut", opts.seq_len),
        ));
    }
    let mut columns: BTreeMap<String, String> = match c.meta.get("columns") {
        Some(Value::Object(m)) => m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect(),
        _ => BTreeMap::new(),
    };
    if let Some(answer) = c.messages[last_user + 1..].iter().find(|m| m.role == "assistant") {
        columns.entry("completion".into()).or_insert_with(|| answer.content.clone());
    }
    Ok(PromptRow { id: c.id.clone(), prompt_ids: enc.get_ids().iter().map(|&t| t as i32).collect(), columns })
}

pub fn run(opts: &PrepareOptions) -> Result<PrepareSummary> {
    let start = Instant::now();
    let setup = Setup::new(opts)?;
    let hashing = hash_sources(&opts.inputs);
    let mut front = Front::new(&opts.out, &opts.dedup, opts.strict, true);
    let (mut train, mut eval) = (PromptWriter::new("train"), PromptWriter::new("eval"));
    let mut map = opts.map.clone();
    map.prompts = true;
    let pb = crate::progress::rows("prepare prompts");
    stream_conversations(&opts.inputs, &map, |batch| {
        let kept = front.admit(batch.items)?;
        let rows: Vec<(Conversation, Prompted)> = kept
            .into_par_iter()
            .map(|c| {
                let r = prompt_row(&c, &setup, opts);
                (c, r)
            })
            .collect();
        for (c, r) in rows {
            match r {
                Ok(row) => {
                    front.counts.keep(&c.id);
                    if is_eval(&c.id, opts.seed, opts.eval_fraction) {
                        eval.push(row)
                    } else {
                        train.push(row)
                    }
                }
                Err((why, detail)) => front.reject(Reject::for_conversation(&c, why, detail))?,
            }
        }
        pb.set_position(front.counts.rows_read);
        Ok(())
    })?;
    pb.finish_and_clear();
    let stats = |w: &PromptWriter| SplitStats {
        samples: w.len() as u64,
        rows: w.len() as u64,
        tokens: w.tokens,
        ..Default::default()
    };
    let (mut train_stats, mut eval_stats) = (stats(&train), stats(&eval));
    let (files, mut columns) = train.finish(&opts.out)?;
    train_stats.files = files;
    let (files, eval_columns) = eval.finish(&opts.out)?;
    eval_stats.files = files;
    columns.extend(eval_columns);
    columns.sort();
    columns.dedup();
    let sources = joined(hashing, "hashing")?;
    let prompts = train_stats.samples + eval_stats.samples;
    let tokens = train_stats.tokens + eval_stats.tokens;
    let mut manifest = setup.manifest(opts, ShardKind::Prompts, sources);
    manifest.method = Some("prompts".into());
    manifest.columns = COLUMNS.iter().map(|c| c.to_string()).chain(columns).collect();
    let account = |shared| ManifestAccounting { prompts: Some(prompts), tokens, ..shared };
    let made = Made {
        method: PrepareMethod::Prompts,
        truncated: 0,
        dropped_too_long: 0,
        samples: prompts,
        packed_rows: prompts,
        tokens,
        trainable_tokens: 0,
        fill_ratio: 0.0,
        tokens_seen: tokens,
        train: train_stats,
        eval: eval_stats,
    };
    finish(opts, front, manifest, account, made, start)
}
