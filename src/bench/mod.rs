//! Benchmarks: lm-evaluation-harness task files scored on a model and its adapters.
//!
//! [`task`] reads a task YAML and its local documents; [`prompt`] turns each document into the
//! context lm-eval would build (few-shot, chat template or not); [`Prepared`] holds every context
//! and request in tokens, once for all models; [`loglik`] scores choices and targets by their
//! log-likelihood, [`generate`] answers generation tasks; [`metrics`] scores each document and
//! aggregates, as lm-eval does. `tunekit bench` (`commands::bench`) runs them over the base and
//! each adapter and compares.

pub mod generate;
pub mod loglik;
pub mod metrics;
pub mod prompt;
pub mod python_random;
pub mod task;

use crate::tokenize::TokenizerInfo;
use crate::train::model::Model;
use anyhow::{bail, Result};
use indicatif::ProgressBar;
use loglik::Request;
use prompt::{Prompter, Style, Target};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use task::{OutputType, Task};

/// How contexts are built and how long they may be.
pub struct Settings<'a> {
    pub style: Style<'a>,
    /// Longest sequence the model reads (context + answer).
    pub max_length: usize,
    pub seed: u64,
    /// Score only the first n documents.
    pub limit: Option<usize>,
}

/// A task's documents as contexts and requests, the same for every model.
pub struct Prepared<'t> {
    pub task: &'t Task,
    pub contexts: Vec<String>,
    pub choices: Vec<Vec<String>>,
    pub targets: Vec<Target>,
    /// Log-likelihood requests in document order (a document's choices together).
    pub requests: Vec<Request>,
    /// Generation prompts in tokens.
    pub prompts: Vec<Vec<u32>>,
}

impl<'t> Prepared<'t> {
    pub fn new(task: &'t Task, tok: &TokenizerInfo, s: &Settings) -> Result<Prepared<'t>> {
        let p = Prompter::new(task, s.seed)?;
        let n = s.limit.unwrap_or(usize::MAX).min(task.docs.len());
        let (mut contexts, mut choices, mut targets) = (vec![], vec![], vec![]);
        for i in 0..n {
            let doc = &task.docs[i];
            let c = p.choices(doc)?;
            if task.output == OutputType::MultipleChoice && c.len() < 2 {
                bail!(
                    "{}: the document at {} has {} choice; a choice needs two or more",
                    task.at("doc_to_choice"),
                    doc.place(),
                    c.len()
                );
            }
            targets.push(p.target(doc, &c)?);
            choices.push(c);
            contexts.push(p.context(i, s.style)?);
        }
        let prefix = tok
            .special("bos_token")
            .or_else(|| tok.special("eos_token"))
            .and_then(|t| tok.tokenizer.token_to_id(t))
            .unwrap_or(0);
        let (mut requests, mut prompts) = (vec![], vec![]);
        match task.output {
            OutputType::MultipleChoice | OutputType::Loglikelihood => {
                let mut pairs = vec![];
                for i in 0..n {
                    if task.output == OutputType::MultipleChoice {
                        pairs.extend(choices[i].iter().map(|c| (contexts[i].clone(), p.continuation(c, s.style))));
                    } else {
                        let answer = p.answer_text(&targets[i], &choices[i]);
                        pairs.push((contexts[i].clone(), answer));
                    }
                }
                requests = loglik::encode_pairs(tok, &pairs, prefix)?;
                let mut k = 0;
                for (i, ch) in choices.iter().enumerate() {
                    let m = if task.output == OutputType::MultipleChoice { ch.len() } else { 1 };
                    for r in &requests[k..k + m] {
                        if r.context.len() + r.continuation.len() > s.max_length + 1 {
                            bail!(
                                "{}: the document at {} needs {} tokens of context and {} of answer, more than the \
                                 model's {} (--max-length): the template leaves no room for the answer; shorten \
                                 `doc_to_text`, use fewer shots (num_fewshot {}) or raise --max-length",
                                task.at("doc_to_text"),
                                task.docs[i].place(),
                                r.context.len(),
                                r.continuation.len(),
                                s.max_length,
                                task.num_fewshot
                            );
                        }
                        if r.continuation.is_empty() {
                            bail!(
                                "{}: the answer of the document at {} is empty once tokenised; nothing to score",
                                task.at("doc_to_target"),
                                task.docs[i].place()
                            );
                        }
                    }
                    k += m;
                }
            }
            OutputType::GenerateUntil => {
                let room = s.max_length.saturating_sub(task.generation.max_gen_toks);
                for (i, c) in contexts.iter().enumerate() {
                    let ids = tok.tokenizer.encode(c.as_str(), true).map_err(|e| anyhow::anyhow!("tokenize: {e}"))?;
                    let ids = ids.get_ids().to_vec();
                    if ids.len() > room {
                        bail!(
                            "{}: the context of the document at {} is {} tokens; with max_gen_toks {} that is more than \
                             the model's {} (--max-length): the template leaves no room for the answer; shorten \
                             `doc_to_text`, use fewer shots or lower max_gen_toks",
                            task.at("doc_to_text"),
                            task.docs[i].place(),
                            ids.len(),
                            task.generation.max_gen_toks,
                            s.max_length
                        );
                    }
                    prompts.push(ids);
                }
            }
        }
        Ok(Prepared { task, contexts, choices, targets, requests, prompts })
    }

    /// Documents to score.
    pub fn len(&self) -> usize {
        self.contexts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.contexts.is_empty()
    }

    /// Work units for a progress bar (requests or prompts).
    pub fn units(&self) -> u64 {
        (self.requests.len() + self.prompts.len()) as u64
    }

    /// Every document scored by one model: per metric key (`acc,none`, `exact_match,strict-match`)
    /// the per-document scores, and a log line per document.
    pub fn evaluate(
        &self,
        model: &Model,
        tok: &TokenizerInfo,
        s: &Settings,
        batch_tokens: usize,
        bar: &ProgressBar,
    ) -> Result<Scores> {
        let task = self.task;
        let mut per: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut logs = Vec::with_capacity(self.len());
        match task.output {
            OutputType::MultipleChoice => {
                let scored = loglik::score(model, &self.requests, s.max_length, batch_tokens, bar)?;
                let mut k = 0;
                for i in 0..self.len() {
                    let ch = &self.choices[i];
                    let part = &scored[k..k + ch.len()];
                    k += ch.len();
                    let lls: Vec<f64> = part.iter().map(|x| x.loglik).collect();
                    let Target::Index(gold) = self.targets[i] else { unreachable!("choice targets are indices") };
                    let pk = metrics::picks(&lls, ch);
                    for m in &task.metrics {
                        let v = match m.name.as_str() {
                            "acc" => pk.pred == gold,
                            "acc_norm" => pk.pred_norm == gold,
                            "acc_bytes" => pk.pred_bytes == gold,
                            _ => part[gold].greedy,
                        };
                        per.entry(format!("{},none", m.name)).or_default().push(v as u8 as f64);
                    }
                    logs.push(json!({"doc_id": i, "target": gold, "loglikelihoods": lls, "pred": pk.pred, "pred_norm": pk.pred_norm,
                        "greedy": part.iter().map(|x| x.greedy).collect::<Vec<_>>()}));
                }
            }
            OutputType::Loglikelihood => {
                let scored = loglik::score(model, &self.requests, s.max_length, batch_tokens, bar)?;
                for (i, x) in scored.iter().enumerate() {
                    for m in &task.metrics {
                        let v = if m.name == "perplexity" { x.loglik } else { x.greedy as u8 as f64 };
                        per.entry(format!("{},none", m.name)).or_default().push(v);
                    }
                    logs.push(json!({"doc_id": i, "loglikelihood": x.loglik, "greedy": x.greedy}));
                }
            }
            OutputType::GenerateUntil => {
                let answers = generate::answers(model, tok, &self.prompts, &task.generation, s.seed, bar)?;
                for (i, answer) in answers.iter().enumerate() {
                    let refs: Vec<String> = match &self.targets[i] {
                        Target::Index(j) => vec![self.choices[i][*j].clone()],
                        Target::Text(t) => vec![t.clone()],
                        Target::Texts(v) => v.clone(),
                    };
                    let mut filtered = serde_json::Map::new();
                    for f in &task.filters {
                        let got = metrics::filtered(answer, f);
                        for m in &task.metrics {
                            let hit = refs.iter().any(|r| metrics::exact_match(&got, r, m));
                            per.entry(format!("{},{}", m.name, f.name)).or_default().push(hit as u8 as f64);
                        }
                        filtered.insert(f.name.clone(), Value::String(got));
                    }
                    logs.push(json!({"doc_id": i, "target": refs, "response": answer, "filtered": filtered}));
                }
            }
        }
        Ok(Scores { per_doc: per, logs })
    }
}

/// One model's scores on one task.
pub struct Scores {
    pub per_doc: BTreeMap<String, Vec<f64>>,
    pub logs: Vec<Value>,
}

impl Scores {
    /// The task-level value of a metric key: the mean, or for perplexity exp(-mean log-likelihood).
    pub fn aggregate(&self, key: &str) -> metrics::Estimate {
        let xs = &self.per_doc[key];
        if key.starts_with("perplexity,") {
            let m = metrics::mean_stderr(xs);
            return metrics::Estimate { value: (-m.value).exp(), stderr: f64::NAN };
        }
        metrics::mean_stderr(xs)
    }
}
