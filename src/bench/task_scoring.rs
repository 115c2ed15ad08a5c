//! How a task's answers are produced and scored: its `output_type`, `metric_list` (lm-eval's metrics with their
//! options, and tunekit's judges and pass@k), `generation_kwargs` and `filter_list`, read from the
//! task file with errors that name its line.

use super::task_file::{plain_text, Lines};
use anyhow::{anyhow, bail, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// How a task scores a document (lm-eval's `output_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputType {
    /// The log-likelihood of each choice after the context; the best is the answer.
    MultipleChoice,
    /// A generated answer, filtered and compared with the target.
    GenerateUntil,
    /// The log-likelihood of the target after the context (and whether it is the greedy answer).
    Loglikelihood,
}

/// A metric of `metric_list`, with the options of lm-eval's exact_match, and the judge of
/// tunekit's `judge` and `pass_at_k` (a command, or a reward model directory) with pass@k's k.
#[derive(Debug, Clone, Default)]
pub struct MetricSpec {
    pub name: String,
    pub ignore_case: bool,
    pub ignore_punctuation: bool,
    pub ignore_numbers: bool,
    pub regexes_to_ignore: Vec<String>,
    pub judge: Option<JudgeSpec>,
    pub k: usize,
}

/// Who scores an answer for `judge` and `pass_at_k`.
#[derive(Debug, Clone, PartialEq)]
pub enum JudgeSpec {
    /// `command: CMD`: rewards' command contract (one JSON object per answer in, a number per line out).
    Command(String),
    /// `model: DIR`: a reward model trained with `train --method reward`.
    Model(PathBuf),
}

/// One step of a filter pipeline (`filter_list[].filter[]`).
#[derive(Debug, Clone)]
pub enum FilterStep {
    Regex { pattern: regex::Regex, group_select: i64, fallback: String },
    TakeFirst,
    Lowercase,
    Uppercase,
    RemoveWhitespace,
}

#[derive(Debug, Clone)]
pub struct FilterPipeline {
    pub name: String,
    pub steps: Vec<FilterStep>,
}

/// `generation_kwargs`: greedy unless `do_sample`.
#[derive(Debug, Clone)]
pub struct Generation {
    pub until: Vec<String>,
    pub max_gen_toks: usize,
    pub do_sample: bool,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
}

pub(super) fn metrics(cfg: &Map<String, Value>, output: OutputType, file: &Path, t: &Lines) -> Result<Vec<MetricSpec>> {
    let Some(list) = cfg.get("metric_list") else {
        let names: &[&str] = match output {
            OutputType::MultipleChoice => &["acc", "acc_norm"],
            OutputType::GenerateUntil => &["exact_match"],
            OutputType::Loglikelihood => &["perplexity", "acc"],
        };
        return Ok(names.iter().map(|n| MetricSpec { name: n.to_string(), ..Default::default() }).collect());
    };
    let Value::Array(list) = list else { bail!("{}: metric_list is a list", t.at("metric_list")) };
    let allowed: &[&str] = match output {
        OutputType::MultipleChoice => &["acc", "acc_norm", "acc_bytes", "exact_match"],
        OutputType::GenerateUntil => &["exact_match", "number_match", "f1", "rougeL", "judge", "pass_at_k"],
        OutputType::Loglikelihood => &["perplexity", "acc"],
    };
    list.iter()
        .map(|m| {
            let name = m.get("metric").and_then(Value::as_str).unwrap_or_default().to_string();
            if !allowed.contains(&name.as_str()) {
                bail!(
                    "{}: metric `{name}` is not supported for this output_type ({})",
                    t.at("metric_list"),
                    allowed.join(", ")
                );
            }
            let flag = |k: &str| m.get(k).and_then(Value::as_bool).unwrap_or(false);
            let regexes_to_ignore = match m.get("regexes_to_ignore") {
                Some(Value::Array(a)) => a.iter().map(plain_text).collect(),
                Some(Value::String(s)) => vec![s.clone()],
                _ => vec![],
            };
            for r in &regexes_to_ignore {
                regex::Regex::new(r)
                    .map_err(|e| anyhow!("{}: regexes_to_ignore `{r}` does not compile: {e}", t.at("metric_list")))?;
            }
            let judge = match (m.get("command").and_then(Value::as_str), m.get("model").and_then(Value::as_str)) {
                (Some(c), None) if !c.trim().is_empty() => Some(JudgeSpec::Command(c.to_string())),
                (None, Some(dir)) => {
                    // Beside the task file first, as data files are.
                    let beside = file.parent().unwrap_or(Path::new(".")).join(dir);
                    Some(JudgeSpec::Model(if beside.exists() { beside } else { PathBuf::from(dir) }))
                }
                (None, None) => None,
                _ => bail!("{}: metric `{name}` takes one judge: `command: CMD` or `model: DIR`", t.at("metric_list")),
            };
            match (name.as_str(), &judge) {
                ("judge", None) => bail!(
                    "{}: metric `judge` needs `command: CMD` (prints a score per answer) or `model: DIR` (a reward \
                     model from `tunekit train --method reward`)",
                    t.at("metric_list")
                ),
                ("pass_at_k", Some(JudgeSpec::Model(_)) | None) => bail!(
                    "{}: metric `pass_at_k` needs `command: CMD`, which prints 1 for an answer that passes and 0 \
                     for one that does not",
                    t.at("metric_list")
                ),
                _ => {}
            }
            let k = positive(m.get("k"), "`k` of pass_at_k", || t.at("metric_list"))?;
            Ok(MetricSpec {
                name,
                ignore_case: flag("ignore_case"),
                ignore_punctuation: flag("ignore_punctuation"),
                ignore_numbers: flag("ignore_numbers"),
                regexes_to_ignore,
                judge,
                k,
            })
        })
        .collect()
}

/// A whole number of 1 or more (1 when absent).
pub(super) fn positive(v: Option<&Value>, what: &str, at: impl Fn() -> String) -> Result<usize> {
    match v {
        None => Ok(1),
        Some(v) => v
            .as_u64()
            .filter(|&n| n >= 1)
            .map(|n| n as usize)
            .ok_or_else(|| anyhow!("{}: {what} must be a whole number, 1 or more", at())),
    }
}

pub(super) fn generation(cfg: &Map<String, Value>, fewshot_delimiter: &str, t: &Lines) -> Result<Generation> {
    let g = cfg.get("generation_kwargs").and_then(Value::as_object);
    let get = |k: &str| g.and_then(|g| g.get(k));
    let until = match get("until") {
        None => vec![fewshot_delimiter.to_string()],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a.iter().map(plain_text).collect(),
        Some(_) => bail!("{}: generation_kwargs.until is a string or a list", t.at("generation_kwargs")),
    };
    let max_gen_toks = ["max_gen_toks", "max_new_tokens", "max_tokens"]
        .iter()
        .find_map(|k| get(k).and_then(Value::as_u64))
        .unwrap_or(256) as usize;
    let temperature = get("temperature").and_then(Value::as_f64).unwrap_or(0.0);
    let do_sample = get("do_sample").and_then(Value::as_bool).unwrap_or(temperature > 0.0);
    Ok(Generation {
        until,
        max_gen_toks,
        do_sample,
        temperature: if do_sample { temperature.max(1e-6) } else { 0.0 },
        top_p: get("top_p").and_then(Value::as_f64).unwrap_or(1.0),
        top_k: get("top_k").and_then(Value::as_u64).unwrap_or(0) as usize,
    })
}

pub(super) fn filters(cfg: &Map<String, Value>, t: &Lines) -> Result<Vec<FilterPipeline>> {
    let Some(list) = cfg.get("filter_list") else {
        return Ok(vec![FilterPipeline { name: "none".into(), steps: vec![FilterStep::TakeFirst] }]);
    };
    let Value::Array(list) = list else { bail!("{}: filter_list is a list", t.at("filter_list")) };
    list.iter()
        .map(|p| {
            let name = p.get("name").map(plain_text).unwrap_or_else(|| "none".into());
            let steps = p.get("filter").and_then(Value::as_array).cloned().unwrap_or_default();
            let steps = steps
                .iter()
                .map(|s| {
                    let f = s.get("function").and_then(Value::as_str).unwrap_or_default();
                    Ok(match f {
                        "regex" => {
                            let pat = s.get("regex_pattern").map(plain_text).unwrap_or(r"#### (\-?[0-9\.\,]+)".into());
                            FilterStep::Regex {
                                pattern: regex::Regex::new(&pat).map_err(|e| {
                                    anyhow!("{}: regex_pattern `{pat}` does not compile here: {e}", t.at("filter_list"))
                                })?,
                                group_select: s.get("group_select").and_then(Value::as_i64).unwrap_or(0),
                                fallback: s.get("fallback").map(plain_text).unwrap_or("[invalid]".into()),
                            }
                        }
                        "take_first" => FilterStep::TakeFirst,
                        "lowercase" => FilterStep::Lowercase,
                        "uppercase" => FilterStep::Uppercase,
                        "remove_whitespace" => FilterStep::RemoveWhitespace,
                        other => bail!(
                            "{}: filter function `{other}` is not supported (regex, take_first, lowercase, uppercase, \
                             remove_whitespace)",
                            t.at("filter_list")
                        ),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(FilterPipeline { name, steps })
        })
        .collect()
}
