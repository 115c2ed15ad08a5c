//! `prepare --method preference`: preference pairs to preference shards. Each pair's shared prompt
//! is rendered with the chat template twice, once ending in the chosen answer and once in the
//! rejected one; only the final answer (and its end-of-turn) is trained. Pairs are never split or
//! packed; dedup and the train/eval split work on whole pairs; the manifest counts pairs as prepare
//! counts rows.

use super::{finish, hash_sources, joined, Made, PrepareMethod, PrepareOptions, PrepareSummary, Setup};
use crate::accounting::{reason, Reject};
use crate::admit::Front;
use crate::ingest::stream_conversations;
use crate::pack::fit::fit;
use crate::pack::manifest::{ManifestAccounting, ShardKind, SplitStats};
use crate::pack::preference::{PreferenceRow, PreferenceWriter, COLUMNS};
use crate::record::{Conversation, Message};
use crate::split::is_eval;
use crate::tokenize::{LossMode, Sample, Tokenizing};
use anyhow::Result;
use rayon::prelude::*;
use std::time::Instant;

/// The conversation that ends in one of the pair's answers.
fn side(conv: &Conversation, answer: &Message) -> Conversation {
    let mut c = Conversation::new(conv.id.clone(), conv.messages.clone());
    c.tools = conv.tools.clone();
    c.messages.push(answer.clone());
    c
}

pub fn run(opts: &PrepareOptions) -> Result<PrepareSummary> {
    let start = Instant::now();
    let setup = Setup::new(opts)?;
    let tokenizing = Tokenizing { tok: &setup.tok, template: &setup.template, mode: LossMode::Last };
    let hashing = hash_sources(&opts.inputs);
    let mut front = Front::new(&opts.out, &opts.dedup, opts.strict, true);
    let (mut train, mut eval) = (PreferenceWriter::new(&opts.out, "train"), PreferenceWriter::new(&opts.out, "eval"));
    let (mut dropped, mut truncated) = (0u64, 0u64);
    let pb = crate::progress::rows("prepare pairs");
    stream_conversations(&opts.inputs, &opts.map, |batch| {
        let kept = front.admit(batch.items)?;
        type Pair = Result<(Sample, Sample), (&'static str, String)>;
        let pairs: Vec<(Conversation, Pair)> = kept
            .into_par_iter()
            .map(|c| {
                let res = match (&c.chosen, &c.rejected) {
                    (Some(ch), Some(rj)) => {
                        tokenizing.sample(&side(&c, ch)).and_then(|a| Ok((a, tokenizing.sample(&side(&c, rj))?)))
                    }
                    _ => Err((reason::NOT_PREFERENCE, format!("{} has no chosen/rejected pair", c.id))),
                };
                (c, res)
            })
            .collect();
        let (mut to_train, mut to_eval) = (Vec::new(), Vec::new());
        for (c, res) in pairs {
            let fitted = |s| fit(s, opts.seq_len, opts.too_long);
            match res.and_then(|(a, b)| Ok((fitted(a)?, fitted(b)?))) {
                Ok(((a, cut_a), (b, cut_b))) => {
                    front.counts.keep(&c.id);
                    truncated += (cut_a || cut_b) as u64;
                    let row = PreferenceRow {
                        chosen_input_ids: a.input_ids.iter().map(|&t| t as i32).collect(),
                        chosen_labels: a.labels,
                        rejected_input_ids: b.input_ids.iter().map(|&t| t as i32).collect(),
                        rejected_labels: b.labels,
                    };
                    if is_eval(&c.id, opts.seed, opts.eval_fraction) {
                        to_eval.push(row)
                    } else {
                        to_train.push(row)
                    }
                }
                Err((why, detail)) => {
                    dropped += (why == reason::TOO_LONG) as u64;
                    front.reject(Reject::for_conversation(&c, why, detail))?;
                }
            }
        }
        train.write(to_train)?;
        eval.write(to_eval)?;
        pb.set_position(front.counts.rows_read);
        Ok(())
    })?;
    pb.finish_and_clear();
    let stats = |w: &PreferenceWriter| SplitStats {
        samples: w.pairs,
        rows: w.pairs,
        tokens: w.tokens,
        trainable_tokens: w.trained,
        fill_ratio: 0.0,
        files: vec![],
    };
    let (tp, ep) = (stats(&train), stats(&eval));
    let train_stats = SplitStats { files: train.finish()?, ..tp };
    let eval_stats = SplitStats { files: eval.finish()?, ..ep };
    let sources = joined(hashing, "hashing")?;
    let pairs = train_stats.samples + eval_stats.samples;
    let tokens = train_stats.tokens + eval_stats.tokens;
    let trainable = train_stats.trainable_tokens + eval_stats.trainable_tokens;
    let mut manifest = setup.manifest(opts, ShardKind::Preference, sources);
    manifest.method = Some("preference".into());
    manifest.loss = LossMode::Last;
    manifest.columns = COLUMNS.iter().map(|c| c.to_string()).collect();
    let account = |shared| ManifestAccounting {
        truncated: (truncated > 0).then_some(truncated),
        pairs: Some(pairs),
        tokens,
        trainable_tokens: trainable,
        ..shared
    };
    let made = Made {
        method: PrepareMethod::Preference,
        truncated,
        dropped_too_long: dropped,
        samples: pairs,
        packed_rows: pairs,
        tokens,
        trainable_tokens: trainable,
        fill_ratio: 0.0,
        tokens_seen: tokens,
        train: train_stats,
        eval: eval_stats,
    };
    finish(opts, front, manifest, account, made, start)
}
