//! What the online RL recipes (GRPO, PPO) share: prompt shards read and ordered by epoch, rollouts
//! (sampled with the policy as it is through the rollout engine, decoded, scored by the rewards,
//! each completion written to `rollouts.jsonl`), completions packed as model batches, micro-batches
//! by a token budget, and held-out evaluation: the mean reward of greedy completions of the eval
//! prompts. Data parallel: each rank samples and scores its share of a rollout's prompts, every
//! rank then holds the whole rollout in the one-process order, and trains on its share of the
//! step's micro-batches (`World::share`).

use crate::pack::manifest::Manifest;
use crate::pack::prompts::{read_prompts, PromptRow};
use crate::pack::rows::PackedRow;
use crate::split::SplitMix64;
use crate::tokenize::TokenizerInfo;
use crate::train::model::batch::Batch;
use crate::train::model::Model;
use crate::train::options::TrainOptions;
use crate::train::rewards::{RewardContext, Rewards, Sample};
use crate::train::rollout::{complete, SamplingParams};
use crate::train::trainer::Metrics;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// One sampled completion of a rollout, with its rewards.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Seq {
    /// Index of its prompt among the training prompts.
    pub prompt: usize,
    /// The completion's tokens, its stop token included when it has one.
    pub tokens: Vec<u32>,
    /// Ended at a stop token (false: reached --max-new-tokens, truncated).
    pub finished: bool,
    /// The weighted total, and each reward function's value.
    pub reward: f64,
    pub rewards: Vec<f64>,
}

/// The shared state of an RL run.
pub struct Rl<'a> {
    pub opts: &'a TrainOptions,
    pub tok: TokenizerInfo,
    pub stops: Vec<u32>,
    pub rewards: Rewards,
    pub train: Vec<PromptRow>,
    pub eval: Vec<PromptRow>,
    /// The current epoch's prompt order.
    order: (Option<u64>, Vec<usize>),
    log: Option<std::fs::File>,
    /// A resumed run appends to rollouts.jsonl.
    pub resumed: bool,
    pub world: &'static crate::cluster::World,
}

fn prompts_of(dir: &Path, split: &str) -> Result<Vec<PromptRow>> {
    let f = dir.join(crate::pack::shards::single_shard_file_name(split));
    if !f.exists() {
        return Ok(vec![]);
    }
    read_prompts(&f)
}

impl<'a> Rl<'a> {
    pub fn new(opts: &'a TrainOptions, model: &Model) -> Result<Self> {
        if opts.gradient_checkpointing {
            bail!("--gradient-checkpointing is for --method sft; GRPO and PPO keep the plain backward");
        }
        let manifest = Manifest::read(&opts.data)?;
        if manifest.method.as_deref() != Some("prompts") {
            bail!(
                "{}: these are not prompt shards (format \"{}\"); prepare them with `tunekit prepare --method prompts`",
                opts.data.display(),
                manifest.format.name()
            );
        }
        let rl = &opts.rl;
        if rl.prompts_per_step == 0 || rl.num_generations == 0 || rl.sampling.max_new_tokens == 0 {
            bail!("--prompts-per-step, --num-generations and --max-new-tokens must be at least 1");
        }
        let tok_path = rl.tokenizer.clone().unwrap_or_else(|| manifest.tokenizer.path.clone().into());
        let tok = TokenizerInfo::load(&tok_path)
            .with_context(|| format!("the prompts' tokenizer {} (pass --tokenizer)", tok_path.display()))?;
        if !manifest.tokenizer.sha256.is_empty() && tok.sha256 != manifest.tokenizer.sha256 {
            bail!(
                "{} is not the tokenizer the prompts were prepared with (sha256 {} vs {} in the manifest)",
                tok_path.display(),
                tok.sha256,
                manifest.tokenizer.sha256
            );
        }
        let stops = tok.stop_ids();
        if stops.is_empty() {
            bail!("{}: the tokenizer has no end-of-sequence or end-of-turn token to stop at", tok_path.display());
        }
        let ctx = RewardContext {
            policy_model: opts.model.clone(),
            policy_vocab: model.config.vocab_size,
            placement: crate::train::trainer::placement(opts),
            command_timeout: rl.reward_timeout,
        };
        let rewards = Rewards::build(&rl.rewards, &ctx)?;
        let train = prompts_of(&opts.data, "train")?;
        if train.is_empty() {
            bail!("{}: no training prompts (train-00000-of-00001.parquet)", opts.data.display());
        }
        let eval = prompts_of(&opts.data, "eval")?;
        let world = crate::cluster::world();
        Ok(Rl { opts, tok, stops, rewards, train, eval, order: (None, vec![]), log: None, resumed: false, world })
    }

    /// The rollout a checkpoint's state holds ([`rollout_state`]); the run is marked resumed.
    pub fn restore_rollout<T: serde::de::DeserializeOwned>(&mut self, state: &Value) -> Result<Option<T>> {
        let r = serde_json::from_value(state["rollout"].clone()).context("the checkpoint's rollout")?;
        self.resumed = true;
        Ok(r)
    }

    /// Prompts per rollout: `--prompts-per-step` on each rank.
    fn per_rollout(&self) -> usize {
        self.opts.rl.prompts_per_step * self.world.size
    }

    /// Rollouts in an epoch of the training prompts.
    pub fn rollouts_per_epoch(&self) -> u64 {
        self.train.len().div_ceil(self.per_rollout()) as u64
    }

    /// The prompts of rollout `k`, continuing through seeded epoch orders.
    pub fn batch(&mut self, k: u64) -> Vec<usize> {
        let (n, p) = (self.train.len() as u64, self.per_rollout() as u64);
        (k * p..(k + 1) * p)
            .map(|g| {
                let epoch = g / n;
                if self.order.0 != Some(epoch) {
                    let mut o: Vec<usize> = (0..self.train.len()).collect();
                    SplitMix64::new(self.opts.seed ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407)).shuffle(&mut o);
                    self.order = (Some(epoch), o);
                }
                self.order.1[(g % n) as usize]
            })
            .collect()
    }

    /// The seed of one completion: it depends on the run's seed, the rollout and the completion's
    /// slot only, so a resumed run samples exactly what the uninterrupted one would.
    fn seed(&self, rollout: u64, slot: usize) -> u64 {
        let mut r = SplitMix64::new(self.opts.seed ^ 0x5A3F_11CE ^ rollout.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for _ in 0..=slot % 7 {
            r.next_u64();
        }
        r.next_u64() ^ (slot as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9)
    }

    /// `num_generations` completions of the prompts at `positions` of the rollout's `prompts`,
    /// sampled with the model as it is; and the sampling's (seconds, tokens). A completion's seed
    /// comes from its slot in the whole rollout, whichever rank samples it.
    fn sample(
        &self,
        model: &Model,
        prompts: &[usize],
        positions: &[usize],
        rollout: u64,
    ) -> Result<(Vec<Seq>, (f64, usize))> {
        let g = self.opts.rl.num_generations;
        let ids: Vec<Vec<u32>> =
            positions.iter().map(|&i| self.train[prompts[i]].prompt_ids.iter().map(|&t| t as u32).collect()).collect();
        let refs: Vec<&[u32]> = ids.iter().map(|v| v.as_slice()).collect();
        let rows: Vec<usize> = (0..positions.len()).flat_map(|i| std::iter::repeat_n(i, g)).collect();
        let seeds: Vec<u64> = (0..rows.len()).map(|k| self.seed(rollout, positions[k / g] * g + k % g)).collect();
        let t0 = Instant::now();
        let done = complete(model, &refs, &rows, &seeds, &self.opts.rl.sampling, &self.stops)?;
        let secs = t0.elapsed().as_secs_f64();
        let tokens = done.iter().map(|c| c.tokens.len()).sum();
        let seqs = done
            .into_iter()
            .zip(&rows)
            .map(|(c, &i)| Seq {
                prompt: prompts[positions[i]],
                tokens: c.tokens,
                finished: c.finished,
                reward: 0.0,
                rewards: vec![],
            })
            .collect();
        Ok((seqs, (secs, tokens)))
    }

    /// Rollout `index`: `num_generations` completions of each of its prompts, sampled with the
    /// model as it is and scored; and the sampling's (seconds, tokens). In a data-parallel run each
    /// rank samples and scores the prompts at positions rank, rank + W, ...; every rank then holds
    /// the whole rollout in the one-process order (the seconds of the slowest rank, all tokens).
    pub fn rollout(&mut self, model: &Model, index: u64) -> Result<(Vec<Seq>, (f64, usize))> {
        let prompts = self.batch(index);
        let (w, g) = (self.world.size, self.opts.rl.num_generations);
        let positions: Vec<usize> = (self.world.rank..prompts.len()).step_by(w).collect();
        let (mut seqs, (secs, tokens)) = self.sample(model, &prompts, &positions, index)?;
        let train = std::mem::take(&mut self.train);
        let scored = self.score(&mut seqs, &train);
        self.train = train;
        scored?;
        if w == 1 {
            return Ok((seqs, (secs, tokens)));
        }
        let all = self.world.gather((seqs, secs, tokens))?;
        // Prompt position i was sampled by rank i % w, as that rank's (i / w)-th prompt.
        let seqs =
            (0..prompts.len()).flat_map(|i| all[i % w].0[(i / w) * g..(i / w + 1) * g].iter().cloned()).collect();
        let secs = all.iter().map(|a| a.1).fold(0.0, f64::max);
        Ok((seqs, (secs, all.iter().map(|a| a.2).sum())))
    }

    /// Per-completion values computed by each rank for its completions, made whole on every rank.
    pub fn gather_per_seq<T>(&self, mine: Vec<(usize, T)>, n: usize) -> Result<Vec<T>>
    where
        T: Serialize + serde::de::DeserializeOwned + Clone + Default,
    {
        let mut out = vec![T::default(); n];
        for (i, v) in self.world.gather(mine)?.into_iter().flatten() {
            out[i] = v;
        }
        Ok(out)
    }

    /// The text of a completion (its stop token and special tokens left out).
    pub fn text(&self, tokens: &[u32], finished: bool) -> Result<String> {
        let body = if finished { &tokens[..tokens.len() - 1] } else { tokens };
        self.tok.tokenizer.decode(body, true).map_err(|e| anyhow::anyhow!("decode: {e}"))
    }

    /// Scores completions of `prompts` (training or held-out rows), filling in their rewards;
    /// returns each function's values.
    pub fn score(&mut self, seqs: &mut [Seq], prompts: &[PromptRow]) -> Result<Vec<(String, Vec<f64>)>> {
        let texts: Vec<(String, String)> = seqs
            .iter()
            .map(|s| {
                let p = &prompts[s.prompt];
                let ids: Vec<u32> = p.prompt_ids.iter().map(|&t| t as u32).collect();
                let prompt = self.tok.tokenizer.decode(&ids, true).map_err(|e| anyhow::anyhow!("decode: {e}"))?;
                Ok((prompt, self.text(&s.tokens, s.finished)?))
            })
            .collect::<Result<_>>()?;
        // A completion's label: its prompt's id and which of that prompt's completions it is.
        let mut seen: std::collections::HashMap<usize, usize> = Default::default();
        let labels: Vec<String> = seqs
            .iter()
            .map(|s| {
                let k = seen.entry(s.prompt).or_default();
                *k += 1;
                format!("{}#{}", prompts[s.prompt].id, *k - 1)
            })
            .collect();
        let samples: Vec<Sample> = seqs
            .iter()
            .zip(&texts)
            .zip(labels)
            .map(|((s, (prompt, completion)), label)| Sample {
                label,
                prompt,
                completion,
                prompt_ids: &prompts[s.prompt].prompt_ids,
                completion_ids: &s.tokens,
                columns: &prompts[s.prompt].columns,
            })
            .collect();
        let scores = self.rewards.score(&samples)?;
        for (i, s) in seqs.iter_mut().enumerate() {
            s.reward = scores.total[i];
            s.rewards = scores.per_fn.iter().map(|(_, v)| v[i]).collect();
        }
        Ok(scores.per_fn)
    }

    /// Appends a rollout's completions to `rollouts.jsonl`: prompt, completion, rewards, advantage.
    pub fn log(&mut self, step: u64, seqs: &[Seq], advantages: &[f64]) -> Result<()> {
        if !self.world.is_main() {
            return Ok(()); // rank 0 writes for all (every rank holds the whole rollout)
        }
        if self.log.is_none() {
            let path = self.opts.out.join("rollouts.jsonl");
            let f = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(self.resumed)
                .truncate(!self.resumed)
                .open(&path)
                .with_context(|| format!("cannot write {}", path.display()))?;
            self.log = Some(f);
        }
        let names = self.rewards.names();
        let mut lines = String::new();
        for (s, a) in seqs.iter().zip(advantages) {
            let p = &self.train[s.prompt];
            let ids: Vec<u32> = p.prompt_ids.iter().map(|&t| t as u32).collect();
            let prompt = self.tok.tokenizer.decode(&ids, true).map_err(|e| anyhow::anyhow!("decode: {e}"))?;
            let rewards: Map<String, Value> = names.iter().cloned().zip(s.rewards.iter().map(|&r| json!(r))).collect();
            let line = json!({
                "step": step, "prompt_id": p.id, "prompt": prompt, "completion": self.text(&s.tokens, s.finished)?,
                "reward": s.reward, "rewards": rewards, "advantage": a, "tokens": s.tokens.len(), "finished": s.finished,
            });
            lines.push_str(&line.to_string());
            lines.push('\n');
        }
        let f = self.log.as_mut().expect("opened above");
        f.write_all(lines.as_bytes())?;
        f.flush()?;
        Ok(())
    }

    /// Completions `idx` of `seqs` as one packed row: each prompt + completion a segment, labels on
    /// the completion tokens (so the batch's trained positions are the completion tokens, in order).
    pub fn batch_of(&self, seqs: &[Seq], idx: &[usize], device: &candle_core::Device) -> Result<Batch> {
        let mut row = PackedRow::default();
        for &i in idx {
            let s = &seqs[i];
            let p = &self.train[s.prompt].prompt_ids;
            row.input_ids.extend(p.iter().copied().chain(s.tokens.iter().map(|&t| t as i32)));
            row.labels.extend(std::iter::repeat_n(-100, p.len()).chain(s.tokens.iter().map(|&t| t as i32)));
            let len = p.len() + s.tokens.len();
            row.position_ids.extend(0..len as i32);
            row.seq_lengths.push(len as i32);
        }
        Batch::from_rows(&[&row], device)
    }

    /// Completions grouped into micro-batches of at most `--batch-tokens` (a longer one alone).
    pub fn micro_batches(&self, seqs: &[Seq]) -> Vec<Vec<usize>> {
        let order: Vec<usize> = (0..seqs.len()).collect();
        crate::train::data::micro_batches(&order, self.opts.batch_tokens, |i| {
            self.train[seqs[i].prompt].prompt_ids.len() + seqs[i].tokens.len()
        })
    }

    /// Mean reward of greedy completions of the held-out prompts (and each function's mean).
    pub fn evaluate(&mut self, model: &Model) -> Result<Option<Metrics>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        let greedy = SamplingParams { temperature: 0.0, ..self.opts.rl.sampling };
        let mut seqs = vec![];
        for chunk in (0..self.eval.len()).collect::<Vec<_>>().chunks(64) {
            let ids: Vec<Vec<u32>> =
                chunk.iter().map(|&p| self.eval[p].prompt_ids.iter().map(|&t| t as u32).collect()).collect();
            let refs: Vec<&[u32]> = ids.iter().map(|v| v.as_slice()).collect();
            let rows: Vec<usize> = (0..chunk.len()).collect();
            let done = complete(model, &refs, &rows, &vec![0; rows.len()], &greedy, &self.stops)?;
            seqs.extend(done.into_iter().zip(chunk).map(|(c, &p)| Seq {
                prompt: p,
                tokens: c.tokens,
                finished: c.finished,
                reward: 0.0,
                rewards: vec![],
            }));
        }
        let eval = std::mem::take(&mut self.eval);
        let per_fn = self.score(&mut seqs, &eval);
        self.eval = eval;
        let per_fn = per_fn?;
        let n = seqs.len() as f64;
        let mut m = Metrics::from([("reward".to_string(), seqs.iter().map(|s| s.reward).sum::<f64>() / n)]);
        for (name, v) in per_fn {
            m.insert(format!("rewards/{name}"), v.iter().sum::<f64>() / n);
        }
        m.insert("completions/mean_length".into(), seqs.iter().map(|s| s.tokens.len() as f64).sum::<f64>() / n);
        Ok(Some(m))
    }
}

/// A recipe's checkpoint state: its current rollout (so that a resumed run continues that
/// rollout's iterations, not a new one).
pub fn rollout_state<T: Serialize>(rollout: &Option<T>) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("rollout".into(), serde_json::to_value(rollout).unwrap_or(Value::Null));
    m
}

/// TRL's completion metrics of a rollout: lengths, the share truncated, terminated lengths.
pub fn completion_metrics(seqs: &[Seq]) -> Map<String, Value> {
    let lens: Vec<f64> = seqs.iter().map(|s| s.tokens.len() as f64).collect();
    let term: Vec<f64> = seqs.iter().filter(|s| s.finished).map(|s| s.tokens.len() as f64).collect();
    let stats = |v: &[f64]| -> (f64, f64, f64) {
        if v.is_empty() {
            return (0.0, 0.0, 0.0);
        }
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        (mean, v.iter().cloned().fold(f64::INFINITY, f64::min), v.iter().cloned().fold(f64::NEG_INFINITY, f64::max))
    };
    let (mean, min, max) = stats(&lens);
    let (tmean, tmin, tmax) = stats(&term);
    let mut m = Map::new();
    for (k, v) in [
        ("completions/mean_length", mean),
        ("completions/min_length", min),
        ("completions/max_length", max),
        ("completions/clipped_ratio", 1.0 - term.len() as f64 / lens.len().max(1) as f64),
        ("completions/mean_terminated_length", tmean),
        ("completions/min_terminated_length", tmin),
        ("completions/max_terminated_length", tmax),
    ] {
        m.insert(k.into(), json!(v));
    }
    m
}

/// The reward metrics of a rollout: the mean and std of the total, each function's mean and std.
pub fn reward_metrics(seqs: &[Seq], names: &[String]) -> Map<String, Value> {
    use crate::train::objectives::grpo::std_unbiased;
    let total: Vec<f64> = seqs.iter().map(|s| s.reward).collect();
    let mut m = Map::new();
    m.insert("reward".into(), json!(total.iter().sum::<f64>() / total.len().max(1) as f64));
    m.insert("reward_std".into(), json!(nan_as_null(std_unbiased(&total))));
    for (i, name) in names.iter().enumerate() {
        let v: Vec<f64> = seqs.iter().map(|s| s.rewards[i]).collect();
        m.insert(format!("rewards/{name}/mean"), json!(v.iter().sum::<f64>() / v.len().max(1) as f64));
        m.insert(format!("rewards/{name}/std"), json!(nan_as_null(std_unbiased(&v))));
    }
    m
}

fn nan_as_null(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}
