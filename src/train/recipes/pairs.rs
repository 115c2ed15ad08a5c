//! The preference-pair loop shared by DPO and reward models: `--grad-accum` pairs per step in a
//! seeded order per epoch, the loss averaged over them, with the rewards of both sides, their
//! accuracy and margin as metrics and held-out. Data parallel: each step's `--grad-accum` x
//! world-size pairs are dealt round-robin to the ranks, each pair's loss divided by the pairs of the
//! whole step, so the ranks' sum is the one-process step.

use crate::pack::preference::PreferenceRow;
use crate::train::data::{load_pairs, EpochOrder};
use crate::train::io::peft::save_reward_head;
use crate::train::model::Model;
use crate::train::objectives::{evaluate_pairs, PairObjective};
use crate::train::options::TrainOptions;
use crate::train::trainer::{grads_of, GradSum, Metrics, Recipe, Step, Trainable};
use anyhow::{bail, Context, Result};
use serde_json::{json, Map};
use std::path::Path;

/// A pair recipe: the objective, the data, and what the method adds to the loop.
pub struct Pairs<'a> {
    pub name: &'static str,
    pub objective: Box<dyn PairObjective + 'a>,
    /// DPO's beta, for the KL estimate in the metrics (none for a reward model).
    pub kl_beta: Option<f64>,
    train: Vec<PreferenceRow>,
    eval: Vec<PreferenceRow>,
    world: &'static crate::cluster::World,
    /// Which pairs each step takes.
    order: EpochOrder,
}

impl<'a> Pairs<'a> {
    pub fn new(
        opts: &TrainOptions,
        name: &'static str,
        objective: Box<dyn PairObjective + 'a>,
        kl_beta: Option<f64>,
    ) -> Result<Self> {
        if opts.gradient_checkpointing {
            bail!("--gradient-checkpointing is for --method sft; DPO and reward runs keep the plain backward");
        }
        let what = || {
            format!(
                "--method {name} trains on preference pairs: prepare them with `tunekit prepare --method preference`"
            )
        };
        let train = load_pairs(&opts.data, "train").with_context(what)?;
        if train.is_empty() {
            bail!(
                "{}: no preference pairs; prepare them with `tunekit prepare --method preference`",
                opts.data.display()
            );
        }
        let eval = load_pairs(&opts.data, "eval").with_context(what)?;
        let world = crate::cluster::world();
        let per_step = opts.grad_accum.max(1) * world.size;
        let order = EpochOrder::new(train.len(), per_step, opts.seed);
        Ok(Pairs { name, objective, kl_beta, train, eval, world, order })
    }
}

/// A reference-free pair objective (ORPO, SimPO) over the preference shards: the policy alone.
pub fn run(
    opts: &TrainOptions,
    name: &'static str,
    objective: Box<dyn PairObjective>,
    resume: Option<&Path>,
) -> Result<crate::train::trainer::TrainSummary> {
    let t = crate::train::trainer::load_trainable(opts, resume)?;
    let recipe = Pairs::new(opts, name, objective, None)?;
    crate::train::trainer::train(opts, t, recipe, resume)
}

impl Recipe for Pairs<'_> {
    const EXAMPLES: &'static str = "pairs";

    fn name(&self) -> &'static str {
        self.name
    }

    fn examples(&self) -> (usize, usize) {
        (self.train.len(), self.eval.len())
    }

    fn steps_per_epoch(&self) -> u64 {
        self.order.steps_per_epoch()
    }

    fn step(&mut self, t: &Trainable, step: u64) -> Result<Step> {
        let chunk = self.order.step(step).to_vec();
        // This rank's pairs of the step; every loss is divided by the step's pairs over all ranks.
        let n = chunk.len() as f64;
        let mine: Vec<usize> = self.world.share(&chunk).map(|(_, &i)| i).collect();
        // Summed over the pairs (and, in a data-parallel run, the ranks): loss, both rewards, hits.
        let mut sums = [0.0f64; 4];
        let names = self.objective.extra_metrics();
        let mut extra = vec![0.0f64; names.len()];
        let (mut sum, mut tokens) = (GradSum::default(), 0);
        for &i in &mine {
            let p = &self.train[i];
            let o = self.objective.pair(&t.model, p)?;
            for (s, v) in sums.iter_mut().zip([
                o.loss.to_scalar::<f32>()? as f64,
                o.reward_chosen,
                o.reward_rejected,
                (o.reward_chosen > o.reward_rejected) as u8 as f64,
            ]) {
                *s += v;
            }
            for (k, v) in &o.extra {
                if let Some(i) = names.iter().position(|n| n == k) {
                    extra[i] += v;
                }
            }
            tokens += p.chosen_input_ids.len() + p.rejected_input_ids.len();
            sum.add(grads_of(&t.vars_named, &(o.loss / n)?.backward()?)?)?;
        }
        // The loop sums the loss over the ranks; the rewards' means are of the whole step.
        let loss = sums[0] / n;
        self.world.sum_f64(&mut sums[1..])?;
        let [_, rc, rr, acc] = sums;
        let mut metrics = Map::new();
        for (k, v) in [
            ("rewards/chosen", rc / n),
            ("rewards/rejected", rr / n),
            ("rewards/accuracies", acc / n),
            ("rewards/margins", (rc - rr) / n),
        ] {
            metrics.insert(k.into(), json!(v));
        }
        // KL estimate: mean policy-minus-reference log-ratio of the chosen and rejected answers.
        if let Some(beta) = self.kl_beta {
            metrics.insert("kl".into(), json!((rc + rr) / (2.0 * n * beta)));
        }
        // The method's own metrics (ORPO's NLL and log-odds, ...), over the whole step.
        if !extra.is_empty() {
            self.world.sum_f64(&mut extra)?;
        }
        for (k, v) in names.iter().zip(extra) {
            metrics.insert(k.to_string(), json!(v / n));
        }
        let grads = sum.finish(t, "empty step")?;
        Ok(Step { loss, grads, tokens, examples: mine.len(), metrics })
    }

    fn evaluate(&mut self, model: &Model) -> Result<Option<Metrics>> {
        if self.eval.is_empty() {
            return Ok(None);
        }
        Ok(Some(evaluate_pairs(model, &self.eval, self.objective.as_ref())?))
    }

    /// A reward model's score head, as PEFT saves `modules_to_save = ["score"]` (a full fine-tune's
    /// is among the model directory's weights already).
    fn save_extra(&self, model: &Model, dir: &Path) -> Result<()> {
        match &model.score {
            Some(h) if !model.is_full() => save_reward_head(dir, h.as_tensor()),
            _ => Ok(()),
        }
    }
}
