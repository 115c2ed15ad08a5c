//! Training recipes: one file per method over the shared loop of [`crate::train::trainer`]
//! ([`sft`], [`dpo`], [`reward`], [`kto`], [`grpo`], [`rloo`], [`ppo`]; the preference-pair loop of dpo and reward in
//! [`pairs`], which runs the reference-free ORPO and SimPO itself, the rollouts and rewards of grpo and ppo in [`rl`]). [`run`] picks the recipe of the
//! options' method.

pub mod dpo;
pub mod grpo;
pub mod kto;
pub mod pairs;
pub mod ppo;
pub mod reward;
pub mod rl;
pub mod rloo;
pub mod sft;

use crate::train::options::{Method, TrainOptions};
use crate::train::trainer::TrainSummary;
use anyhow::Result;
use std::path::Path;

/// Trains as `opts` says, from the start or from the checkpoint `resume`.
pub fn run(opts: &TrainOptions, resume: Option<&Path>) -> Result<TrainSummary> {
    // One run writes a run directory at a time (in a data-parallel run, rank 0 writes it).
    let _lock = match crate::cluster::world().is_main() {
        true => Some(crate::output::DirLock::acquire(&opts.out, "tunekit train")?),
        false => None,
    };
    match opts.method {
        Method::Sft => sft::run(opts, resume),
        Method::Dpo(d) => dpo::run(opts, d, resume),
        Method::Reward => reward::run(opts, resume),
        Method::Orpo(o) => pairs::run(opts, "orpo", Box::new(o), resume),
        Method::Simpo(s) => pairs::run(opts, "simpo", Box::new(s), resume),
        Method::Kto(k) => kto::run(opts, k, resume),
        Method::Grpo(g) => grpo::run(opts, g, resume),
        Method::Rloo(r) => rloo::run(opts, r, resume),
        Method::Ppo(p) => ppo::run(opts, p, resume),
    }
}
