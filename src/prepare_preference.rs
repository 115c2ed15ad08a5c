//! `tunekit prepare --method preference`: preference pairs to preference shards. Each pair's
//! shared prompt is rendered with the chat template twice, once ending in the chosen answer and
//! once in the rejected one; only the final answer (and its end-of-turn) is trained. Pairs are
//! never split or packed; dedup and the train/eval split work on whole pairs; the manifest counts
//! pairs as prepare counts rows.

use crate::accounting::reason;
use crate::dedup::front::Front;
use crate::ingest::stream_conversations;
use crate::pack::preference::{PreferenceRow, PreferenceWriter};
use crate::prepare::{chat_template, sha256_file, write_manifest, PrepareOptions, PrepareSummary, SplitStats, TooLong};
use crate::record::Conversation;
use crate::split::is_eval;
use crate::tokenize::{LossMode, Sample, TokenizerInfo, Tokenizing};
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde_json::{json, Value};
use std::time::Instant;

fn side(conv: &Conversation, answer: &crate::record::Message) -> Conversation {
    let mut c = Conversation::new(conv.id.clone(), conv.messages.clone());
    c.tools = conv.tools.clone();
    c.messages.push(answer.clone());
    c
}

fn fit(mut s: Sample, opts: &PrepareOptions) -> Result<Sample, &'static str> {
    if s.len() <= opts.seq_len {
        return Ok(s);
    }
    if opts.too_long == TooLong::Drop {
        return Err(reason::TOO_LONG);
    }
    s.input_ids.truncate(opts.seq_len);
    s.labels.truncate(opts.seq_len);
    if s.trained() == 0 {
        return Err(reason::PROMPT_TOO_LONG);
    }
    Ok(s)
}

pub fn run(opts: &PrepareOptions) -> Result<PrepareSummary> {
    let start = Instant::now();
    let tok = TokenizerInfo::load(&opts.tokenizer)?;
    let template = chat_template(&tok, opts.template.as_deref())?;
    let tokenizing = Tokenizing { tok: &tok, template: &template, mode: LossMode::Last };
    std::fs::create_dir_all(&opts.out).with_context(|| format!("cannot create {}", opts.out.display()))?;
    let manifest_path = opts.out.join("manifest.json");
    let _ = std::fs::remove_file(&manifest_path);
    let mut front = Front::new(&opts.out, &opts.dedup, opts.strict, true);
    let (mut train, mut eval) = (PreferenceWriter::new(&opts.out, "train"), PreferenceWriter::new(&opts.out, "eval"));
    let mut dropped = 0u64;
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
            let pair = res.and_then(|(a, b)| match (fit(a, opts), fit(b, opts)) {
                (Ok(a), Ok(b)) => Ok((a, b)),
                (Err(r), _) | (_, Err(r)) => Err((r, format!("longer than --seq-len {}", opts.seq_len))),
            });
            match pair {
                Ok((a, b)) => {
                    front.counts.rows_kept += 1;
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
                Err((reason, detail)) => {
                    dropped += (reason == reason::TOO_LONG) as u64;
                    front.reject(crate::accounting::Reject::for_conversation(&c, reason, detail))?;
                }
            }
        }
        train.write(to_train)?;
        eval.write(to_eval)?;
        pb.set_position(front.counts.rows_read);
        Ok(())
    })?;
    pb.finish_and_clear();
    let stats = |w: &PreferenceWriter, files: Vec<String>| SplitStats {
        samples: w.pairs,
        rows: w.pairs,
        tokens: w.tokens,
        trainable_tokens: w.trained,
        fill_ratio: 0.0,
        files,
    };
    let (tp, ep) = (stats(&train, vec![]), stats(&eval, vec![]));
    let train_stats = SplitStats { files: train.finish()?, ..tp };
    let eval_stats = SplitStats { files: eval.finish()?, ..ep };
    let (rejects_file, duplicates_file) = front.finish()?;
    let counts = front.counts.clone();
    if !counts.balanced() {
        bail!("internal accounting error: {counts:?}");
    }
    let sources: Vec<Value> = opts
        .inputs
        .iter()
        .map(|p| Ok(json!({"path": p.display().to_string(), "sha256": sha256_file(p)?})))
        .collect::<Result<_>>()?;
    let pairs = train_stats.samples + eval_stats.samples;
    let tokens = train_stats.tokens + eval_stats.tokens;
    let trainable = train_stats.trainable_tokens + eval_stats.trainable_tokens;
    let manifest = json!({
        "format": "tunekit-preference-shards",
        "format_version": 1,
        "method": "preference",
        "tool": {"name": "tunekit", "version": crate::VERSION},
        "sources": sources,
        "tokenizer": {"path": tok.path.display().to_string(), "sha256": tok.sha256, "vocab_size": tok.vocab_size, "special_tokens": Value::Object(tok.specials.clone())},
        "template": {"name": template.name, "sha256": template.sha256},
        "seq_len": opts.seq_len,
        "loss": "last",
        "too_long": opts.too_long,
        "seed": opts.seed,
        "eval_fraction": opts.eval_fraction,
        "dedup": &opts.dedup,
        "columns": crate::pack::preference::COLUMNS,
        "accounting": {
            "rows_read": counts.rows_read,
            "rejected": counts.rejected,
            "rejected_by_reason": &counts.rejected_by_reason,
            "duplicates_exact": counts.duplicates_exact,
            "duplicates_near": counts.duplicates_near,
            "dropped_too_long": dropped,
            "pairs": pairs,
            "tokens": tokens,
            "trainable_tokens": trainable,
        },
        "splits": {"train": &train_stats, "eval": &eval_stats},
    });
    write_manifest(&manifest_path, &manifest)?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(PrepareSummary {
        command: "prepare",
        method: crate::prepare::PrepareMethod::Preference,
        out: opts.out.display().to_string(),
        manifest: manifest_path.display().to_string(),
        rows_per_s: counts.rows_read as f64 / seconds.max(1e-9),
        tokens_per_s: tokens as f64 / seconds.max(1e-9),
        counts,
        truncated: 0,
        dropped_too_long: dropped,
        samples: pairs,
        packed_rows: pairs,
        tokens,
        trainable_tokens: trainable,
        fill_ratio: 0.0,
        train: train_stats,
        eval: eval_stats,
        rejects_file,
        duplicates_file,
        seconds,
    })
}
