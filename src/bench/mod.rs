//! Benchmarks: lm-evaluation-harness task files scored on a model and its adapters.
//!
//! [`task`] reads a task YAML and its local documents ([`task_scoring`] its output type, metrics,
//! generation and filters; [`task_file`] where its keys are); [`prompt`] turns each document into the
//! context lm-eval would build (few-shot, chat template or not); [`Prepared`] holds every context
//! and request in tokens, once for all models; [`loglik`] scores choices and targets by their
//! log-likelihood, [`generate`] answers generation tasks; [`metrics`] scores each document and
//! aggregates, as lm-eval does, [`text_match`] and [`judge`] score answers further (numbers, F1,
//! ROUGE-L, a command or a reward model, pass@k); [`held_out`] makes a task of a shard directory's
//! eval split. `tunekit bench` (`commands::bench`) runs them over the base and
//! each adapter and compares.

pub mod generate;
pub mod held_out;
pub mod judge;
pub mod loglik;
pub mod metrics;
pub mod prompt;
pub mod python_random;
pub mod task;
pub mod task_file;
pub mod task_scoring;
pub mod text_match;

use crate::tokenize::TokenizerInfo;
use crate::train::model::Model;
use crate::train::rewards::Sample;
use anyhow::{bail, Result};
use indicatif::ProgressBar;
use judge::Judges;
use loglik::Request;
use prompt::{Prompter, Style, Target};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use task::{MetricSpec, OutputType, Task};

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
        if let Some(prompts) = &task.prompt_tokens {
            return Ok(Self::of_tokens(task, prompts, s));
        }
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

    /// A generation task whose prompts are tokens already (held-out conversations).
    fn of_tokens(task: &'t Task, prompts: &[Vec<u32>], s: &Settings) -> Prepared<'t> {
        let n = s.limit.unwrap_or(usize::MAX).min(task.docs.len());
        let text = |i: usize, k: &str| task.docs[i].fields[k].as_str().unwrap_or_default().to_string();
        Prepared {
            task,
            contexts: (0..n).map(|i| text(i, "context")).collect(),
            choices: vec![vec![]; n],
            targets: (0..n).map(|i| Target::Text(text(i, "reference"))).collect(),
            requests: vec![],
            prompts: prompts[..n].to_vec(),
        }
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
        (self.requests.len() + self.prompts.len() * self.task.repeats) as u64
    }

    /// Every document scored by one model: per metric key (`acc,none`, `exact_match,strict-match`)
    /// the per-document scores, and a log line per document.
    pub fn evaluate(
        &self,
        model: &Model,
        tok: &TokenizerInfo,
        s: &Settings,
        batch_tokens: usize,
        judges: &mut Judges,
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
                let r = task.repeats;
                let flat = generate::answers(model, tok, &self.prompts, r, &task.generation, s.seed, bar)?;
                let answers: Vec<&[String]> = flat.chunks(r).collect();
                let refs: Vec<Vec<String>> = self
                    .targets
                    .iter()
                    .zip(&self.choices)
                    .map(|(t, ch)| match t {
                        Target::Index(j) => vec![ch[*j].clone()],
                        Target::Text(t) => vec![t.clone()],
                        Target::Texts(v) => v.clone(),
                    })
                    .collect();
                let mut filtered: Vec<serde_json::Map<String, Value>> = vec![serde_json::Map::new(); self.len()];
                for f in &task.filters {
                    let got: Vec<Vec<String>> =
                        answers.iter().map(|a| a.iter().map(|x| metrics::filtered(x, f)).collect()).collect();
                    for m in &task.metrics {
                        let values = self.answer_scores(m, &got, &refs, tok, judges)?;
                        per.entry(format!("{},{}", metric_name(m), f.name)).or_default().extend(values);
                    }
                    for (i, g) in got.iter().enumerate() {
                        filtered[i].insert(f.name.clone(), Value::String(g[0].clone()));
                    }
                }
                for (i, a) in answers.iter().enumerate() {
                    let scores: serde_json::Map<String, Value> =
                        per.iter().map(|(k, v)| (k.clone(), json!(v[i]))).collect();
                    let mut log = json!({"doc_id": i, "target": refs[i], "response": a[0], "filtered": filtered[i], "scores": scores});
                    if r > 1 {
                        log["responses"] = json!(a);
                    }
                    logs.push(log);
                }
            }
        }
        Ok(Scores { per_doc: per, logs })
    }
}

impl Prepared<'_> {
    /// One document's score per metric of its filtered answers (`got[doc][repeat]`) against its
    /// references: the first answer's best match over the references, a judge's score of the first
    /// answer, or pass@k over all of them.
    fn answer_scores(
        &self,
        m: &MetricSpec,
        got: &[Vec<String>],
        refs: &[Vec<String>],
        tok: &TokenizerInfo,
        judges: &mut Judges,
    ) -> Result<Vec<f64>> {
        let best = |score: &dyn Fn(&str, &str) -> f64| -> Vec<f64> {
            got.iter().zip(refs).map(|(g, rs)| rs.iter().map(|r| score(&g[0], r)).fold(0.0, f64::max)).collect()
        };
        Ok(match m.name.as_str() {
            "exact_match" => best(&|g, r| metrics::exact_match(g, r, m) as u8 as f64),
            "number_match" => best(&|g, r| text_match::number_match(g, r) as u8 as f64),
            "f1" => best(&|g, r| text_match::token_f1(g, r)),
            "rougeL" => best(&|g, r| text_match::rouge_l(g, r)),
            "judge" | "pass_at_k" => {
                let spec = m.judge.as_ref().expect("task.rs requires a judge");
                let all = m.name == "pass_at_k";
                let stop = tok.stop_ids().first().copied();
                // (document, answer) pairs to judge.
                let which: Vec<(usize, usize)> =
                    (0..got.len()).flat_map(|i| (0..if all { got[i].len() } else { 1 }).map(move |j| (i, j))).collect();
                let columns: Vec<std::collections::BTreeMap<String, String>> = (0..got.len())
                    .map(|i| {
                        let mut c: std::collections::BTreeMap<String, String> = self.task.docs[i]
                            .fields
                            .iter()
                            .map(|(k, v)| (k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_string)))
                            .collect();
                        c.insert("target".into(), refs[i].first().cloned().unwrap_or_default());
                        c
                    })
                    .collect();
                let prompt_ids: Vec<Vec<i32>> =
                    self.prompts.iter().map(|p| p.iter().map(|&t| t as i32).collect()).collect();
                let completion_ids: Vec<Vec<u32>> = which
                    .iter()
                    .map(|&(i, j)| {
                        let mut ids = tok
                            .tokenizer
                            .encode(got[i][j].as_str(), false)
                            .map(|e| e.get_ids().to_vec())
                            .unwrap_or_default();
                        ids.extend(stop);
                        ids
                    })
                    .collect();
                let samples: Vec<Sample> = which
                    .iter()
                    .zip(&completion_ids)
                    .map(|(&(i, j), ids)| Sample {
                        label: format!("{} document {i} answer {j}", self.task.name),
                        prompt: &self.contexts[i],
                        completion: &got[i][j],
                        prompt_ids: &prompt_ids[i],
                        completion_ids: ids,
                        columns: &columns[i],
                    })
                    .collect();
                let scores = judges.score(spec, &samples)?;
                if all {
                    scores
                        .chunks(got.first().map_or(1, Vec::len))
                        .map(|s| text_match::pass_at_k(s.len(), s.iter().filter(|&&x| x > 0.0).count(), m.k))
                        .collect()
                } else {
                    scores
                }
            }
            other => unreachable!("task.rs admits no metric {other} for generation"),
        })
    }
}

/// A metric's name in its key: `pass@K` for pass_at_k.
fn metric_name(m: &MetricSpec) -> String {
    match m.name.as_str() {
        "pass_at_k" => format!("pass@{}", m.k),
        n => n.to_string(),
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
