//! `train --method sft`: LoRA on packed shards. Micro-batches of at most `--batch-tokens` tokens in
//! a seeded order per epoch, `--grad-accum` of them per step (continuing across epochs), the loss
//! normalised by the trained tokens of the whole accumulated batch; LoRA dropout from a stream kept
//! in checkpoints; optionally gradient checkpointing. Data parallel: each step's `--grad-accum` x
//! world-size micro-batches are dealt round-robin to the ranks, and every rank scales its gradients
//! by the trained tokens of the whole step, so the ranks' sum is the one-process step.

use crate::split::SplitMix64;
use crate::train::data::Shards;
use crate::train::model::batch::Batch;
use crate::train::model::config::ModelConfig;
use crate::train::model::memory::{estimate, MemoryEstimate, MicroBatch, StepSettings};
use crate::train::model::routing::{aux_loss, ExpertLoad, Routing};
use crate::train::model::Model;
use crate::train::objectives::sft::evaluate;
use crate::train::options::TrainOptions;
use crate::train::trainer::{grads_of, load_trainable, train, GradSum, Metrics, Recipe, Step, TrainSummary, Trainable};
use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};
use std::path::Path;
use std::time::Instant;

pub fn run(opts: &TrainOptions, resume: Option<&Path>) -> Result<TrainSummary> {
    let recipe = Sft::new(opts)?;
    if opts.full {
        recipe.check_memory_plan()?;
    }
    let t = load_trainable(opts, resume)?;
    train(opts, t, recipe, resume)
}

/// What one micro-batch gave: its summed loss, its adapter gradients, the forward and backward
/// seconds, and the routing of a mixture of experts' sparse layers.
struct MicroResult {
    loss: f64,
    grads: Vec<candle_core::Tensor>,
    seconds: (f64, f64),
    routing: Vec<(usize, Routing)>,
}

/// The summed loss of one micro-batch and its adapter gradients scaled by 1 / `trained` (the
/// trained tokens of the whole step); a mixture of experts adds its load-balancing loss times
/// `aux_weight` to what the gradients are of.
fn loss_and_grads(
    opts: &TrainOptions,
    t: &Trainable,
    b: &Batch,
    trained: usize,
    aux_weight: f64,
    rng: &mut SplitMix64,
    profile: bool,
) -> Result<MicroResult> {
    let model = &t.model;
    // Forward time ends when the loss is read; the rest (with checkpointing: the recompute too) is backward.
    let tf = Instant::now();
    let mut forward_done = tf;
    let (loss, grads, routing) = if opts.gradient_checkpointing {
        let (loss, g) =
            model.loss_and_grads_checkpointed(b, Some(rng), opts.logits_chunk, 1.0 / trained as f64, aux_weight)?;
        (loss, g, model.take_routing())
    } else {
        let l = model.loss_sum(b, Some(rng), opts.logits_chunk)?;
        let loss = l.to_scalar::<f32>()? as f64;
        let routing = model.take_routing();
        let mut objective = (l / trained as f64)?;
        if aux_weight != 0.0 {
            let records: Vec<Routing> = routing.iter().map(|(_, r)| r.clone()).collect();
            if let Some(aux) = aux_loss(&records)? {
                objective = (objective + (aux * aux_weight)?)?;
            }
        }
        forward_done = Instant::now();
        (loss, grads_of(&t.vars_named, &objective.backward()?)?, routing)
    };
    if profile {
        model.device.synchronize()?;
    }
    let seconds = ((forward_done - tf).as_secs_f64(), forward_done.elapsed().as_secs_f64());
    Ok(MicroResult { loss, grads, seconds, routing })
}

/// The LoRA dropout stream of `rank`: rank 0's is the one-process run's; the others differ and are
/// reproducible from the seed.
fn dropout_stream(seed: u64, rank: usize) -> SplitMix64 {
    SplitMix64::new(seed ^ 0xD0 ^ (rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

struct Sft<'a> {
    opts: &'a TrainOptions,
    world: &'static crate::cluster::World,
    train: Shards,
    eval: Shards,
    micro_per_epoch: u64,
    /// The current epoch's micro-batches, rebuilt only when the epoch changes.
    epoch_batches: (u64, Vec<Vec<usize>>),
    dropout_rng: SplitMix64,
    /// TUNEKIT_PROFILE=1: forward and backward seconds in metrics.jsonl (adds syncs).
    profile: bool,
    /// The sparse layers already warned about for a collapsed router.
    collapsed_warned: std::collections::BTreeSet<usize>,
}

impl<'a> Sft<'a> {
    fn new(opts: &'a TrainOptions) -> Result<Self> {
        let train = Shards::load(&opts.data, "train")?;
        if train.rows.is_empty() {
            bail!("{}: no training rows (train-*.parquet)", opts.data.display());
        }
        let eval = Shards::load(&opts.data, "eval")?;
        let first = train.micro_batches(&train.epoch_order(opts.seed, 0), opts.batch_tokens);
        let world = crate::cluster::world();
        Ok(Sft {
            opts,
            world,
            micro_per_epoch: first.len() as u64,
            epoch_batches: (0, first),
            train,
            eval,
            dropout_rng: dropout_stream(opts.seed, world.rank),
            profile: std::env::var_os("TUNEKIT_PROFILE").is_some(),
            collapsed_warned: Default::default(),
        })
    }

    /// The load-balancing loss's weight per micro-batch: the coefficient over the step's
    /// micro-batches (the step's objective holds their mean); 0 for a dense model.
    fn aux_weight(&self, t: &Trainable) -> f64 {
        t.model.arch.moe.as_ref().map_or(0.0, |m| m.aux_coef) / self.per_step() as f64
    }

    /// The expert metrics of a step: the mean load-balancing loss over its micro-batches, each sparse
    /// layer's imbalance (the busiest expert's share over the even share) and the worst of them, the
    /// tokens' shares per expert; a warning the first time a layer's router sends nearly every token
    /// to one expert.
    fn expert_metrics(&mut self, load: &ExpertLoad, aux: &[f64], metrics: &mut Map<String, Value>) {
        if load.layers.is_empty() {
            return;
        }
        if !aux.is_empty() {
            metrics.insert("aux_loss".into(), json!(aux.iter().sum::<f64>() / aux.len() as f64));
        }
        let imbalance = load.imbalance();
        let worst = imbalance.iter().map(|x| x.1).fold(0.0, f64::max);
        metrics.insert("expert_imbalance".into(), json!(worst));
        for (layer, x) in &imbalance {
            metrics.insert(format!("expert_imbalance_layer_{layer}"), json!(x));
        }
        let shares: Map<String, Value> = load
            .shares()
            .into_iter()
            .map(|(l, s)| (l.to_string(), json!(s.iter().map(|x| (x * 1e4).round() / 1e4).collect::<Vec<_>>())))
            .collect();
        metrics.insert("expert_load".into(), Value::Object(shares));
        for (layer, expert, share) in load.collapsed() {
            if self.collapsed_warned.insert(layer) {
                crate::progress::warn(&format!(
                    "layer {layer}'s router sent {:.0}% of this step's tokens to expert {expert} (of {}, top-{}): \
                     the other experts are not learning; see expert_load in metrics.jsonl, and consider \
                     --router-aux-loss-coef or a lower learning rate",
                    share * 100.0,
                    load.layers.iter().find(|l| l.0 == layer).map_or(0, |l| l.2.len()),
                    load.top_k
                ));
            }
        }
    }

    /// The step settings the memory estimate assumes for these options.
    fn step_settings(&self) -> StepSettings {
        let o = self.opts;
        StepSettings {
            weight_bytes: 4.0,
            activation_bytes: 4,
            lora_r: o.lora.r,
            targets: if o.full { 7 } else { o.lora.targets.len() },
            gradient_checkpointing: o.gradient_checkpointing,
            logits_chunk: o.logits_chunk,
            full_state_bytes: o.full.then(|| o.optim.optim.state_bytes_per_param()),
            cpu_kernels: crate::train::model::memory::cpu_kernels_on(o.device),
        }
    }

    /// The packed segments of a micro-batch.
    fn shape(&self, mb: &[usize]) -> MicroBatch {
        MicroBatch::of(mb.len(), || mb.iter().flat_map(|&i| self.train.rows[i].seq_lengths.iter().map(|&l| l as usize)))
    }

    /// The current epoch's micro-batch that needs the most memory at `config`'s shapes, with the
    /// estimate.
    fn largest_micro_batch(&self, config: &ModelConfig) -> Option<(&Vec<usize>, MemoryEstimate)> {
        let settings = self.step_settings();
        let cost = |mb: &Vec<usize>| estimate(config, &self.shape(mb), &settings);
        self.epoch_batches.1.iter().map(|mb| (mb, cost(mb))).max_by(|a, b| a.1.total_mb.total_cmp(&b.1.total_mb))
    }

    /// Full fine-tuning's memory plan, before the model is loaded: refused with the numbers when
    /// the largest micro-batch's estimate exceeds the memory the system has available.
    fn check_memory_plan(&self) -> Result<()> {
        let config = crate::train::io::read_config(&self.opts.model)?;
        let Some((mb, e)) = self.largest_micro_batch(&config) else { return Ok(()) };
        let Some(available) = crate::train::device::available_memory_mb() else { return Ok(()) };
        if e.total_mb > available {
            let s = self.shape(mb);
            bail!(
                "full fine-tuning of {} needs about {:.0} MB for its largest micro-batch ({} tokens, longest segment {}): \
                 {:.0} weights, {:.0} gradients, {:.0} optimizer states, {:.0} activations, {:.0} loss head, {:.0} process; \
                 this machine has {available:.0} MB available. Lower it with --optim adamw_8bit (a quarter of the \
                 optimizer states), --gradient-checkpointing (activations) or a smaller --batch-tokens; or train \
                 LoRA adapters (leave out --full)",
                self.opts.model.display(),
                e.total_mb,
                s.tokens,
                s.longest_segment,
                e.weights_mb,
                e.gradients_mb,
                e.optimizer_mb,
                e.activations_mb,
                e.loss_head_mb,
                e.runtime_mb
            );
        }
        crate::progress::note(&format!(
            "full fine-tuning: about {:.0} MB at the largest micro-batch ({:.0} weights, {:.0} gradients, {:.0} \
             optimizer states, {:.0} activations); {available:.0} MB available",
            e.total_mb, e.weights_mb, e.gradients_mb, e.optimizer_mb, e.activations_mb
        ));
        Ok(())
    }

    /// Micro-batches per optimizer step over all ranks.
    fn per_step(&self) -> u64 {
        self.opts.grad_accum as u64 * self.world.size as u64
    }

    /// The rows of this rank's share of the step's micro-batches, continuing across epochs deterministically.
    fn micro_batches(&mut self, step: u64) -> Vec<Vec<usize>> {
        let per_step = self.per_step();
        (self.world.rank as u64..per_step)
            .step_by(self.world.size)
            .map(|k| {
                let g = step * per_step + k;
                let (epoch, idx) = (g / self.micro_per_epoch, g % self.micro_per_epoch);
                if self.epoch_batches.0 != epoch {
                    let order = self.train.epoch_order(self.opts.seed, epoch);
                    self.epoch_batches = (epoch, self.train.micro_batches(&order, self.opts.batch_tokens));
                }
                let list = &self.epoch_batches.1;
                list[idx as usize % list.len()].clone()
            })
            .collect()
    }
}

impl Recipe for Sft<'_> {
    const EXAMPLES: &'static str = "rows";

    fn memory_estimate(&self, config: &ModelConfig) -> Option<MemoryEstimate> {
        self.largest_micro_batch(config).map(|(_, e)| e)
    }

    fn largest_micro_batch_tokens(&self) -> Option<usize> {
        self.epoch_batches.1.iter().map(|mb| self.shape(mb).tokens).max()
    }

    /// The largest micro-batch of the current epoch (by the memory it needs), forward and backward
    /// once with a copy of the dropout stream; the gradients are dropped, so the run is unchanged.
    fn probe(&mut self, t: &Trainable) -> Result<Option<String>> {
        let Some((largest, _)) = self.largest_micro_batch(&t.model.config) else {
            return Ok(None);
        };
        let largest = largest.clone();
        let rows: Vec<_> = largest.iter().map(|&i| &self.train.rows[i]).collect();
        let b = Batch::from_rows(&rows, &t.model.device)?;
        if b.trained == 0 {
            return Ok(None);
        }
        let aux_weight = self.aux_weight(t);
        loss_and_grads(self.opts, t, &b, b.trained, aux_weight, &mut self.dropout_rng.clone(), false)?;
        let s = self.shape(&largest);
        Ok(Some(format!("{} rows, {} tokens, longest segment {}", s.rows, s.tokens, s.longest_segment)))
    }

    fn name(&self) -> &'static str {
        "train"
    }

    fn examples(&self) -> (usize, usize) {
        (self.train.rows.len(), self.eval.rows.len())
    }

    fn steps_per_epoch(&self) -> u64 {
        self.micro_per_epoch.div_ceil(self.per_step())
    }

    fn step(&mut self, t: &Trainable, step: u64) -> Result<Step> {
        let (opts, model) = (self.opts, &t.model);
        let micro = self.micro_batches(step);
        let batches: Vec<Batch> = micro
            .iter()
            .map(|mb| Batch::from_rows(&mb.iter().map(|&i| &self.train.rows[i]).collect::<Vec<_>>(), &model.device))
            .collect::<Result<_>>()?;
        let mut trained: usize = batches.iter().map(|b| b.trained).sum();
        let tokens: usize = batches.iter().map(|b| b.tokens).sum();
        if self.world.size > 1 {
            // The loss is normalised by the trained tokens of the whole step, over every rank.
            let mut all = [trained as f64];
            self.world.sum_f64(&mut all)?;
            trained = all[0] as usize;
        }
        let mut sum = GradSum::default();
        let mut loss_sum = 0.0f64;
        let (mut t_fwd, mut t_bwd) = (0.0, 0.0);
        let aux_weight = self.aux_weight(t);
        let mut load = ExpertLoad { top_k: model.arch.moe.as_ref().map_or(0, |m| m.top_k), ..Default::default() };
        let mut aux = vec![];
        for b in &batches {
            if b.trained == 0 {
                continue;
            }
            let r = loss_and_grads(opts, t, b, trained, aux_weight, &mut self.dropout_rng, self.profile)?;
            loss_sum += r.loss;
            t_fwd += r.seconds.0;
            t_bwd += r.seconds.1;
            sum.add(r.grads)?;
            r.routing.iter().for_each(|(layer, routing)| load.add(*layer, routing));
            let records: Vec<Routing> = r.routing.into_iter().map(|(_, r)| r).collect();
            if let Some(a) = aux_loss(&records)? {
                aux.push(a.to_scalar::<f32>()? as f64);
            }
        }
        let loss = loss_sum / trained.max(1) as f64;
        let grads = if !loss.is_finite() {
            vec![] // the loop stops at a non-finite loss
        } else {
            let empty = "no trained token in this step's batches";
            if trained == 0 {
                bail!("{empty}"); // on every rank: none of them trained a token
            }
            sum.finish(t, empty)?
        };
        let mut metrics = Map::new();
        metrics.insert("trained_tokens".into(), json!(trained));
        self.expert_metrics(&load, &aux, &mut metrics);
        if self.profile {
            metrics.insert("seconds_forward".into(), json!(t_fwd));
            metrics.insert("seconds_backward".into(), json!(t_bwd));
        }
        Ok(Step { loss, grads, tokens, examples: micro.iter().map(Vec::len).sum(), metrics })
    }

    fn evaluate(&mut self, model: &Model) -> Result<Option<Metrics>> {
        if self.eval.rows.is_empty() {
            return Ok(None);
        }
        let (l, _) = evaluate(model, &self.eval, self.opts.batch_tokens, self.opts.logits_chunk)?;
        Ok(Some(Metrics::from([("loss".to_string(), l)])))
    }

    fn state(&self) -> Map<String, Value> {
        let mut m = Map::from_iter([("dropout_rng".to_string(), json!(self.dropout_rng.state()))]);
        if self.world.size > 1 {
            // Each rank's stream, so a resumed run draws what the uninterrupted one would have.
            match self.world.gather_u64(self.dropout_rng.state()) {
                Ok(all) => {
                    m.insert("dropout_rng_by_rank".into(), json!(all));
                }
                Err(e) => crate::progress::warn(&format!("the ranks' dropout streams were not gathered: {e:#}")),
            }
        }
        m
    }

    fn restore(&mut self, state: &Value) -> Result<()> {
        let s = match state.get("dropout_rng_by_rank") {
            Some(all) => all[self.world.rank].as_u64(),
            None => state["dropout_rng"].as_u64(),
        };
        self.dropout_rng = SplitMix64::from_state(s.context("the checkpoint's state has no dropout_rng")?);
        Ok(())
    }
}
