//! `prepare --method kto`: labelled conversations to unpaired preference shards (TRL's unpaired
//! preference format, for KTO). A row with a desirability label (`label`, or `--map label=COLUMN`)
//! becomes one shard row, its final assistant answer the completion; a preference pair becomes two,
//! the chosen answer desirable and the rejected one not (TRL's `unpair_preference_dataset`). Only
//! the final answer (and its end-of-turn) is trained; rows are never packed; the split is by the
//! conversation's id, so both halves of a pair stay on one side.

use super::preference::side;
use super::{finish, hash_sources, joined, Made, PrepareMethod, PrepareOptions, PrepareSummary, Setup, Unpacked};
use crate::accounting::{reason, Reject};
use crate::admit::Front;
use crate::ingest::stream_conversations;
use crate::pack::fit::fit;
use crate::pack::manifest::{ManifestAccounting, ShardKind};
use crate::pack::unpaired::{UnpairedRow, UnpairedWriter, COLUMNS};
use crate::record::Conversation;
use crate::split::is_eval;
use crate::tokenize::{LossMode, Sample, Tokenizing};
use anyhow::Result;
use rayon::prelude::*;
use serde_json::Value;
use std::time::Instant;

/// A conversation's labelled samples, or why it has none.
type Labelled = std::result::Result<Vec<(Sample, bool)>, (&'static str, String)>;

/// The conversations a row stands for, each with its label: a pair's two sides, or the row itself.
fn labelled(c: &Conversation) -> std::result::Result<Vec<(Conversation, bool)>, (&'static str, String)> {
    if let (Some(ch), Some(rj)) = (&c.chosen, &c.rejected) {
        return Ok(vec![(side(c, ch), true), (side(c, rj), false)]);
    }
    let Some(label) = c.meta.get("label").and_then(Value::as_bool) else {
        return Err((
            reason::NOT_LABELLED,
            format!(
                "{} has no desirability label and no chosen/rejected pair: give each row a `label` column \
                 (true/false), name yours with --map label=COLUMN, or give preference pairs",
                c.id
            ),
        ));
    };
    if c.messages.last().map(|m| m.role.as_str()) != Some("assistant") {
        return Err((
            reason::NO_ASSISTANT,
            format!("{}: the last message is not the assistant's; the label is on the final answer", c.id),
        ));
    }
    Ok(vec![(c.clone(), label)])
}

fn tokenize(t: &Tokenizing, c: &Conversation) -> Labelled {
    labelled(c)?.into_iter().map(|(conv, label)| Ok((t.sample(&conv)?, label))).collect()
}

/// What the pass over the inputs leaves for the end.
struct Written {
    front: Front,
    train: UnpairedWriter,
    eval: UnpairedWriter,
    truncated: u64,
    dropped: u64,
}

pub fn run(opts: &PrepareOptions) -> Result<PrepareSummary> {
    let start = Instant::now();
    let setup = Setup::new(opts)?;
    let tokenizing = Tokenizing { tok: &setup.tok, template: &setup.template, mode: LossMode::Last };
    let hashing = hash_sources(&opts.inputs);
    let mut map = opts.map.clone();
    map.labelled = true;
    let mut w = Written {
        front: Front::new(&opts.out, &opts.dedup, opts.strict, true),
        train: UnpairedWriter::new(&opts.out, "train"),
        eval: UnpairedWriter::new(&opts.out, "eval"),
        truncated: 0,
        dropped: 0,
    };
    let pb = crate::progress::rows("prepare kto");
    stream_conversations(&opts.inputs, &map, |batch| {
        let kept = w.front.admit(batch.items)?;
        let done: Vec<(Conversation, Labelled)> = kept
            .into_par_iter()
            .map(|c| {
                let s = tokenize(&tokenizing, &c);
                (c, s)
            })
            .collect();
        let (mut to_train, mut to_eval) = (Vec::new(), Vec::new());
        for (c, res) in done {
            let fitted = res.and_then(|samples| {
                samples
                    .into_iter()
                    .map(|(s, label)| Ok((fit(s, opts.seq_len, opts.too_long)?, label)))
                    .collect::<std::result::Result<Vec<_>, _>>()
            });
            match fitted {
                Ok(rows) => {
                    w.front.counts.keep(&c.id);
                    let split =
                        if is_eval(&c.id, opts.seed, opts.eval_fraction) { &mut to_eval } else { &mut to_train };
                    for ((s, cut), desirable) in rows {
                        w.truncated += cut as u64;
                        let input_ids = s.input_ids.iter().map(|&t| t as i32).collect();
                        split.push(UnpairedRow { input_ids, labels: s.labels, desirable });
                    }
                }
                Err((why, detail)) => {
                    w.dropped += (why == reason::TOO_LONG) as u64;
                    w.front.reject(Reject::for_conversation(&c, why, detail))?;
                }
            }
        }
        w.train.write(to_train)?;
        w.eval.write(to_eval)?;
        pb.set_position(w.front.counts.rows_read);
        Ok(())
    })?;
    pb.finish_and_clear();
    let sources = joined(hashing, "hashing")?;
    let mut manifest = setup.manifest(opts, ShardKind::Unpaired, sources);
    let Written { front, train, eval, truncated, dropped } = w;
    let (desirable, rows) = (train.desirable + eval.desirable, train.rows + eval.rows);
    if rows > 0 && (train.desirable == 0 || train.desirable == train.rows) {
        crate::progress::warn(&format!(
            "every training row is {}: KTO needs desirable and undesirable answers, and `train --method kto` \
             refuses one class",
            if train.desirable == 0 { "undesirable" } else { "desirable" }
        ));
    }
    let split = |w: UnpairedWriter| -> Result<Unpacked> {
        Ok(Unpacked { rows: w.rows, tokens: w.tokens, trained: w.trained, files: w.finish()? })
    };
    let made = Made::unpacked(PrepareMethod::Kto, truncated, dropped, split(train)?, split(eval)?);
    manifest.method = Some("kto".into());
    manifest.loss = LossMode::Last;
    manifest.columns = COLUMNS.iter().map(|c| c.to_string()).collect();
    let made_accounting = made.accounting();
    let account = |shared| ManifestAccounting {
        samples: Some(rows),
        desirable: Some(desirable),
        undesirable: Some(rows - desirable),
        ..made_accounting(shared)
    };
    let mut summary = finish(opts, front, manifest, account, made, start)?;
    summary.desirable = Some(desirable);
    Ok(summary)
}
