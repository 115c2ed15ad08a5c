//! `train --method kto`: KTO on unpaired preference shards (`prepare --method kto`). Each step takes
//! `--grad-accum` x world-size rows in a seeded order per epoch; the reference point is estimated
//! from the step's own rows, each prompt scored with the previous row's completion (TRL rotates the
//! completions within each batch the same way), so a step needs two rows or more. The loss is the
//! mean of the step's weighted row losses; metrics are TRL's (kl, rewards and log-probabilities of
//! the desirable and undesirable rows). Data parallel: the ranks score their share of the step and
//! sum the reference point's terms before any loss.

use crate::pack::unpaired::UnpairedRow;
use crate::train::data::{load_unpaired, EpochOrder};
use crate::train::graph::no_grad;
use crate::train::model::Model;
use crate::train::objectives::kto::{imbalance_advice, partner, Kto};
use crate::train::options::TrainOptions;
use crate::train::trainer::{grads_of, load_trainable, train, GradSum, Metrics, Recipe, Step, TrainSummary, Trainable};
use anyhow::{bail, Context, Result};
use serde_json::{json, Map};
use std::path::Path;

pub struct KtoRecipe {
    kto: Kto,
    train: Vec<UnpairedRow>,
    eval: Vec<UnpairedRow>,
    per_step: usize,
    world: &'static crate::cluster::World,
    /// Which rows each step takes.
    order: EpochOrder,
}

/// Sums over a batch's rows: the loss, and per class (desirable, undesirable) the rows, rewards and
/// log-probabilities, as TRL logs them.
#[derive(Default)]
struct Sums {
    loss: f64,
    kl: f64,
    // [rows, reward, logp] of the desirable, then of the undesirable rows.
    class: [[f64; 3]; 2],
}

impl Sums {
    fn add(&mut self, desirable: bool, loss: f64, reward: f64, logp: f64) {
        self.loss += loss;
        let c = &mut self.class[!desirable as usize];
        c[0] += 1.0;
        c[1] += reward;
        c[2] += logp;
    }

    fn flat(&self) -> Vec<f64> {
        self.class.iter().flatten().copied().collect()
    }

    /// TRL's metric names: each class's mean reward and log-probability (a class absent from the
    /// batch leaves its own out), the margin when both are there.
    fn metrics(flat: &[f64], out: &mut Map<String, serde_json::Value>) {
        let mean = |c: usize, k: usize| (flat[3 * c] > 0.0).then(|| flat[3 * c + k] / flat[3 * c]);
        for (c, side) in [(0, "chosen"), (1, "rejected")] {
            if let (Some(r), Some(l)) = (mean(c, 1), mean(c, 2)) {
                out.insert(format!("rewards/{side}"), json!(r));
                out.insert(format!("logps/{side}"), json!(l));
            }
        }
        if let (Some(a), Some(b)) = (mean(0, 1), mean(1, 1)) {
            out.insert("rewards/margins".into(), json!(a - b));
        }
    }
}

impl KtoRecipe {
    pub fn new(opts: &TrainOptions, kto: Kto) -> Result<Self> {
        if opts.gradient_checkpointing {
            bail!("--gradient-checkpointing is for --method sft; KTO runs keep the plain backward");
        }
        let what = || "--method kto trains on labelled rows: prepare them with `tunekit prepare --method kto`";
        let train = load_unpaired(&opts.data, "train").with_context(what)?;
        if train.is_empty() {
            bail!("{}: no labelled rows; prepare them with `tunekit prepare --method kto`", opts.data.display());
        }
        let desirable = train.iter().filter(|r| r.desirable).count();
        let undesirable = train.len() - desirable;
        if desirable == 0 || undesirable == 0 {
            bail!(
                "{}: all {} training rows are {}; KTO learns from both desirable and undesirable answers \
                 (label some rows the other way, or prepare preference pairs, which give one of each)",
                opts.data.display(),
                train.len(),
                if desirable == 0 { "undesirable" } else { "desirable" }
            );
        }
        let world = crate::cluster::world();
        let per_step = opts.grad_accum.max(1) * world.size;
        if per_step < 2 {
            bail!(
                "--method kto estimates its reference point from the other rows of a step: use --grad-accum 2 \
                 or more (TRL's KTOTrainer refuses a batch of one for the same reason)"
            );
        }
        if world.is_main() {
            if let Some(advice) = imbalance_advice(desirable, undesirable, &kto) {
                crate::progress::warn(&advice);
            }
        }
        let eval = load_unpaired(&opts.data, "eval").with_context(what)?;
        let order = EpochOrder::new(train.len(), per_step, opts.seed);
        Ok(KtoRecipe { kto, train, eval, per_step, world, order })
    }

    /// The reference point of a batch: the KL terms of the rows `share` (each row with its
    /// partner's completion), summed over the ranks when `across`, their mean clamped at zero.
    fn reference_point(&self, model: &Model, batch: &[&UnpairedRow], share: &[usize], across: bool) -> Result<f64> {
        let mut sum = [0.0f64];
        for &k in share {
            sum[0] += self.kto.kl_term(model, batch[k], batch[partner(k, batch.len())])?;
        }
        if across {
            self.world.sum_f64(&mut sum)?;
        }
        Ok(Kto::reference_point(sum[0], batch.len()))
    }
}

pub fn run(opts: &TrainOptions, kto: Kto, resume: Option<&Path>) -> Result<TrainSummary> {
    // The data first: one class only, or a step of one row, is refused before the model loads.
    let recipe = KtoRecipe::new(opts, kto)?;
    let t = load_trainable(opts, resume)?;
    train(opts, t, recipe, resume)
}

impl Recipe for KtoRecipe {
    const EXAMPLES: &'static str = "rows";

    fn name(&self) -> &'static str {
        "kto"
    }

    fn examples(&self) -> (usize, usize) {
        (self.train.len(), self.eval.len())
    }

    fn steps_per_epoch(&self) -> u64 {
        self.order.steps_per_epoch()
    }

    fn step(&mut self, t: &Trainable, step: u64) -> Result<Step> {
        let (order, at) = self.order.at(step);
        let (chunk, skip) = batch_at(order, at, self.per_step);
        let batch: Vec<&UnpairedRow> = chunk.iter().map(|&i| &self.train[i]).collect();
        let share: Vec<usize> = self.world.share(&batch).map(|(k, _)| k).collect();
        let z = self.reference_point(&t.model, &batch, &share, true)?;
        let n = (batch.len() - skip) as f64;
        let mut sums = Sums { kl: z, ..Default::default() };
        let (mut grads, mut tokens, mut examples) = (GradSum::default(), 0, 0);
        for &k in share.iter().filter(|&&k| k >= skip) {
            let row = batch[k];
            let o = self.kto.row(&t.model, row, z)?;
            sums.add(row.desirable, o.loss.to_scalar::<f32>()? as f64, o.reward, o.logp);
            tokens += row.input_ids.len();
            examples += 1;
            grads.add(grads_of(&t.vars_named, &(o.loss / n)?.backward()?)?)?;
        }
        let mut flat = sums.flat();
        self.world.sum_f64(&mut flat)?;
        let mut metrics = Map::new();
        metrics.insert("kl".into(), json!(z));
        Sums::metrics(&flat, &mut metrics);
        let grads = grads.finish(t, "empty step")?;
        // The loop sums the loss over the ranks.
        Ok(Step { loss: sums.loss / n, grads, tokens, examples, metrics })
    }

    /// Held-out: the eval rows in batches of a step's size, each with its own reference point; the
    /// mean loss and reference point, each class's mean reward and log-probability, their margin.
    fn evaluate(&mut self, model: &Model) -> Result<Option<Metrics>> {
        if self.eval.len() < 2 {
            return Ok(None);
        }
        let order: Vec<usize> = (0..self.eval.len()).collect();
        let mut sums = Sums::default();
        let mut batches = 0usize;
        for at in (0..order.len()).step_by(self.per_step) {
            let (chunk, skip) = batch_at(&order, at, self.per_step);
            let batch: Vec<&UnpairedRow> = chunk.iter().map(|&i| &self.eval[i]).collect();
            let every: Vec<usize> = (0..batch.len()).collect();
            let z = self.reference_point(model, &batch, &every, false)?;
            sums.kl += z;
            batches += 1;
            for row in &batch[skip..] {
                let o = no_grad(|| self.kto.row(model, row, z))?;
                sums.add(row.desirable, o.loss.to_scalar::<f32>()? as f64, o.reward, o.logp);
            }
        }
        let flat = sums.flat();
        let mut m = Map::new();
        Sums::metrics(&flat, &mut m);
        let mut out = Metrics::from([
            ("loss".to_string(), sums.loss / self.eval.len() as f64),
            ("kl".to_string(), sums.kl / batches as f64),
        ]);
        for (k, v) in m {
            let name = if k == "rewards/margins" { "reward_margin".to_string() } else { k };
            out.insert(name, v.as_f64().unwrap_or(0.0));
        }
        Ok(Some(out))
    }
}

/// The rows of the batch at `at` of `order` (`per_step` of them, fewer at the end), and how many
/// lead it only to be scored: a last batch of one row borrows the row before it for the reference
/// point, which cannot come from one row alone.
fn batch_at(order: &[usize], at: usize, per_step: usize) -> (Vec<usize>, usize) {
    let mut chunk = order[at..(at + per_step).min(order.len())].to_vec();
    if chunk.len() == 1 && order.len() > 1 {
        chunk.insert(0, order[at - 1]);
        return (chunk, 1);
    }
    (chunk, 0)
}
