//! `prepare --method preference`: preference pairs to preference shards. Each pair's shared prompt
//! is rendered with the chat template twice, once ending in the chosen answer and once in the
//! rejected one; only the final answer (and its end-of-turn) is trained. Pairs are never split or
//! packed; dedup and the train/eval split work on whole pairs; the manifest counts pairs as prepare
//! counts rows.

use super::{finish, hash_sources, joined, Made, PrepareMethod, PrepareOptions, PrepareSummary, Setup, Unpacked};
use crate::accounting::{reason, Reject};
use crate::admit::Front;
use crate::ingest::stream_conversations;
use crate::pack::fit::fit;
use crate::pack::manifest::{Manifest, ManifestAccounting, ShardKind};
use crate::pack::preference::{PreferenceRow, PreferenceWriter, COLUMNS};
use crate::record::{Conversation, Message};
use crate::split::is_eval;
use crate::tokenize::{LossMode, Sample, Tokenizing};
use anyhow::Result;
use rayon::prelude::*;
use std::time::Instant;

/// The conversation that ends in one of the pair's answers.
pub(super) fn side(conv: &Conversation, answer: &Message) -> Conversation {
    let mut c = Conversation::new(conv.id.clone(), conv.messages.clone());
    c.tools = conv.tools.clone();
    c.messages.push(answer.clone());
    c
}

/// Both sides of a preference conversation tokenized, or why they cannot be.
type Pair = std::result::Result<(Sample, Sample), (&'static str, String)>;

fn tokenize_pair(t: &Tokenizing, c: &Conversation) -> Pair {
    match (&c.chosen, &c.rejected) {
        (Some(ch), Some(rj)) => t.sample(&side(c, ch)).and_then(|a| Ok((a, t.sample(&side(c, rj))?))),
        _ => Err((reason::NOT_PREFERENCE, format!("{} has no chosen/rejected pair", c.id))),
    }
}

/// A fitted pair as a shard row.
fn pair_row(a: Sample, b: Sample) -> PreferenceRow {
    PreferenceRow {
        chosen_input_ids: a.input_ids.iter().map(|&t| t as i32).collect(),
        chosen_labels: a.labels,
        rejected_input_ids: b.input_ids.iter().map(|&t| t as i32).collect(),
        rejected_labels: b.labels,
    }
}

/// What the pass over the inputs leaves for the end: the front with its counts, the two writers,
/// and the pairs cut to fit or dropped as too long.
struct Written {
    front: Front,
    train: PreferenceWriter,
    eval: PreferenceWriter,
    truncated: u64,
    dropped: u64,
}

pub fn run(opts: &PrepareOptions) -> Result<PrepareSummary> {
    let start = Instant::now();
    let setup = Setup::new(opts)?;
    let tokenizing = Tokenizing { tok: &setup.tok, template: &setup.template, mode: LossMode::Last };
    let hashing = hash_sources(&opts.inputs);
    let mut w = Written {
        front: Front::new(&opts.out, &opts.dedup, opts.strict, true),
        train: PreferenceWriter::new(&opts.out, "train"),
        eval: PreferenceWriter::new(&opts.out, "eval"),
        truncated: 0,
        dropped: 0,
    };
    let pb = crate::progress::rows("prepare pairs");
    stream_conversations(&opts.inputs, &opts.map, |batch| {
        let kept = w.front.admit(batch.items)?;
        let pairs: Vec<(Conversation, Pair)> = kept
            .into_par_iter()
            .map(|c| {
                let p = tokenize_pair(&tokenizing, &c);
                (c, p)
            })
            .collect();
        let (mut to_train, mut to_eval) = (Vec::new(), Vec::new());
        for (c, res) in pairs {
            let fitted = |s| fit(s, opts.seq_len, opts.too_long);
            match res.and_then(|(a, b)| Ok((fitted(a)?, fitted(b)?))) {
                Ok(((a, cut_a), (b, cut_b))) => {
                    w.front.counts.keep(&c.id);
                    w.truncated += (cut_a || cut_b) as u64;
                    let split =
                        if is_eval(&c.id, opts.seed, opts.eval_fraction) { &mut to_eval } else { &mut to_train };
                    split.push(pair_row(a, b));
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
    finish_pairs(opts, setup.manifest(opts, ShardKind::Preference, sources), w, start)
}

/// The writers closed, the manifest's preference fields, and prepare's shared end.
fn finish_pairs(opts: &PrepareOptions, mut manifest: Manifest, w: Written, start: Instant) -> Result<PrepareSummary> {
    let Written { front, train, eval, truncated, dropped } = w;
    let split = |w: PreferenceWriter| -> Result<Unpacked> {
        Ok(Unpacked { rows: w.pairs, tokens: w.tokens, trained: w.trained, files: w.finish()? })
    };
    let made = Made::unpacked(PrepareMethod::Preference, truncated, dropped, split(train)?, split(eval)?);
    manifest.method = Some("preference".into());
    manifest.loss = LossMode::Last;
    manifest.columns = COLUMNS.iter().map(|c| c.to_string()).collect();
    let pairs = made.samples;
    let made_accounting = made.accounting();
    let account = |shared| ManifestAccounting { pairs: Some(pairs), ..made_accounting(shared) };
    finish(opts, front, manifest, account, made, start)
}
