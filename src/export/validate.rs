//! The checks of OpenAI's fine-tuning data-preparation recipe, each problem with its line number,
//! then the recipe's statistics and the billing estimate. Streams the file (memory flat in its
//! size). Handles chat SFT files and DPO preference files.

use super::tokens::{count_messages, ModelSpec};
use crate::report::stats::Distribution;
use anyhow::{Context, Result};
use rayon::prelude::*;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;
use std::time::Instant;

pub const ALLOWED_KEYS: &[&str] = &["role", "content", "name", "function_call", "tool_calls", "tool_call_id", "weight"];
pub const ROLES: &[&str] = &["system", "user", "assistant", "tool", "function"];
pub const MIN_EXAMPLES: u64 = 10;

#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// The file, when several are validated together (export's rolled-over parts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    pub line: u64,
    pub reason: &'static str,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct ValidationReport {
    pub command: &'static str,
    pub file: String,
    pub model: ModelSpec,
    /// "chat" or "dpo"
    pub kind: &'static str,
    pub examples: u64,
    pub valid: bool,
    pub errors: u64,
    pub errors_by_reason: BTreeMap<String, u64>,
    /// The first problems, with line numbers (all of them are counted above).
    pub problems: Vec<Problem>,
    pub missing_system: u64,
    pub missing_user: u64,
    pub messages_per_example: Distribution,
    pub tokens_per_example: Distribution,
    pub assistant_tokens_per_example: Distribution,
    pub over_token_limit: u64,
    pub epochs: u64,
    pub billed_tokens_per_epoch: u64,
    pub billed_tokens: u64,
    pub seconds: f64,
    pub examples_per_s: f64,
}

/// What one line contributes.
struct LineResult {
    problems: Vec<Problem>,
    n_messages: usize,
    tokens: usize,
    assistant_tokens: usize,
    has_system: bool,
    has_user: bool,
    dpo: bool,
}

fn check_messages(line: u64, msgs: &Value, out: &mut Vec<Problem>, need_assistant: bool) -> Option<Vec<Value>> {
    let p = |reason, detail: String| Problem { file: None, line, reason, detail };
    let Some(list) = msgs.as_array() else {
        out.push(p("missing_messages_list", "no 'messages' list".into()));
        return None;
    };
    if list.is_empty() {
        out.push(p("missing_messages_list", "'messages' is empty".into()));
        return None;
    }
    for (i, m) in list.iter().enumerate() {
        let Some(o) = m.as_object() else {
            out.push(p("message_not_object", format!("message {i} is not an object")));
            continue;
        };
        if !o.contains_key("role")
            || (!o.contains_key("content") && !o.contains_key("tool_calls") && !o.contains_key("function_call"))
        {
            out.push(p("message_missing_key", format!("message {i} has no 'role' or no 'content'")));
        }
        if let Some(k) = o.keys().find(|k| !ALLOWED_KEYS.contains(&k.as_str())) {
            out.push(p(
                "message_unrecognized_key",
                format!("message {i} has the unknown key '{k}' (allowed: {})", ALLOWED_KEYS.join(", ")),
            ));
        }
        let role = o.get("role").and_then(Value::as_str).unwrap_or("");
        if o.contains_key("role") && !ROLES.contains(&role) {
            out.push(p(
                "unrecognized_role",
                format!("message {i} has the role '{role}' (allowed: {})", ROLES.join(", ")),
            ));
        }
        let has_calls =
            o.get("tool_calls").is_some_and(|v| !v.is_null()) || o.get("function_call").is_some_and(|v| !v.is_null());
        match o.get("content") {
            Some(Value::String(s)) if s.trim().is_empty() && !has_calls => {
                out.push(p("missing_content", format!("message {i} has empty content")))
            }
            Some(Value::String(_)) => {}
            Some(Value::Null) | None if has_calls => {}
            Some(_) => out.push(p("missing_content", format!("message {i}: content must be a string"))),
            None => {}
        }
        if let Some(w) = o.get("weight") {
            if !(w == &Value::from(0) || w == &Value::from(1)) {
                out.push(p("invalid_weight", format!("message {i}: weight must be 0 or 1, found {w}")));
            } else if role != "assistant" {
                out.push(p("invalid_weight", format!("message {i}: weight is only allowed on assistant messages")));
            }
        }
    }
    if need_assistant && !list.iter().any(|m| m.get("role").and_then(Value::as_str) == Some("assistant")) {
        out.push(p("example_missing_assistant_message", "no assistant message".into()));
    }
    Some(list.clone())
}

fn check_line(line: u64, text: &[u8], spec: &ModelSpec) -> LineResult {
    let mut r = LineResult {
        problems: Vec::new(),
        n_messages: 0,
        tokens: 0,
        assistant_tokens: 0,
        has_system: false,
        has_user: false,
        dpo: false,
    };
    let v: Value = match serde_json::from_slice(text) {
        Ok(v) => v,
        Err(e) => {
            r.problems.push(Problem {
                file: None,
                line,
                reason: "invalid_json",
                detail: format!("not valid JSON: {e}"),
            });
            return r;
        }
    };
    let Some(o) = v.as_object() else {
        r.problems.push(Problem {
            file: None,
            line,
            reason: "data_type",
            detail: "each line must be a JSON object".into(),
        });
        return r;
    };
    let msgs = if o.contains_key("preferred_output") || o.contains_key("non_preferred_output") {
        r.dpo = true;
        let input = o.get("input").and_then(|i| i.get("messages")).cloned().unwrap_or(Value::Null);
        let mut msgs = check_messages(line, &input, &mut r.problems, false).unwrap_or_default();
        for side in ["preferred_output", "non_preferred_output"] {
            match o.get(side).and_then(Value::as_array) {
                Some(a) if a.len() == 1 && a[0].get("role").and_then(Value::as_str) == Some("assistant") => {
                    let mut sub = Vec::new();
                    check_messages(line, &o[side], &mut sub, true);
                    r.problems.extend(sub);
                    if side == "preferred_output" {
                        msgs.push(a[0].clone());
                    }
                }
                _ => r.problems.push(Problem {
                    file: None,
                    line,
                    reason: "invalid_dpo_output",
                    detail: format!("'{side}' must be a list with one assistant message"),
                }),
            }
        }
        msgs
    } else {
        match check_messages(line, o.get("messages").unwrap_or(&Value::Null), &mut r.problems, true) {
            Some(m) => m,
            None => return r,
        }
    };
    r.n_messages = msgs.len();
    r.has_system = msgs.iter().any(|m| m.get("role").and_then(Value::as_str) == Some("system"));
    r.has_user = msgs.iter().any(|m| m.get("role").and_then(Value::as_str) == Some("user"));
    let (t, a) = count_messages(spec.encoding, &msgs);
    r.tokens = t;
    r.assistant_tokens = a;
    if t > spec.max_tokens_per_example {
        r.problems.push(Problem {
            file: None,
            line,
            reason: "too_many_tokens",
            detail: format!("{t} tokens > {} allowed for {} per example", spec.max_tokens_per_example, spec.model),
        });
    }
    r
}

/// OpenAI's default epochs for a dataset of `n` examples (3, raised toward 100 example-epochs
/// up to 25, lowered above 25,000 example-epochs).
pub fn default_epochs(n: u64) -> u64 {
    const TARGET: u64 = 3;
    if n == 0 {
        return TARGET;
    }
    if n * TARGET < 100 {
        25.min(100 / n)
    } else if n * TARGET > 25_000 {
        1.max(25_000 / n)
    } else {
        TARGET
    }
}

/// Validates one dataset made of one or more files (line numbers are per file).
pub fn validate_files(
    paths: &[std::path::PathBuf],
    spec: &ModelSpec,
    epochs: Option<u64>,
    max_problems: usize,
) -> Result<ValidationReport> {
    validate_many(paths, spec, epochs, max_problems)
}

pub fn validate(path: &Path, spec: &ModelSpec, epochs: Option<u64>, max_problems: usize) -> Result<ValidationReport> {
    validate_many(&[path.to_path_buf()], spec, epochs, max_problems)
}

fn validate_many(
    paths: &[std::path::PathBuf],
    spec: &ModelSpec,
    epochs: Option<u64>,
    max_problems: usize,
) -> Result<ValidationReport> {
    let start = Instant::now();
    let (mut n_msgs, mut toks, mut atoks) = (Vec::new(), Vec::new(), Vec::new());
    let mut problems = Vec::new();
    let mut by_reason: BTreeMap<String, u64> = BTreeMap::new();
    let (mut examples, mut errors, mut missing_system, mut missing_user, mut over, mut dpo_lines) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let mut billed_per_epoch = 0u64;
    let pb = crate::progress::rows("validate");
    for path in paths {
        let mut reader = crate::ingest::read::open_decompressed(path)?;
        let mut line_no = 0u64;
        let file_label = (paths.len() > 1).then(|| path.display().to_string());
        loop {
            let mut batch: Vec<(u64, Vec<u8>)> = Vec::with_capacity(8192);
            while batch.len() < 8192 {
                let mut buf = Vec::new();
                if reader.read_until(b'\n', &mut buf).with_context(|| format!("cannot read {}", path.display()))? == 0 {
                    break;
                }
                line_no += 1;
                if buf.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                batch.push((line_no, buf));
            }
            if batch.is_empty() {
                break;
            }
            let results: Vec<LineResult> = batch.par_iter().map(|(l, t)| check_line(*l, t, spec)).collect();
            for r in results {
                examples += 1;
                if !r.problems.is_empty() {
                    errors += 1;
                }
                for mut p in r.problems {
                    p.file = file_label.clone();
                    *by_reason.entry(p.reason.to_string()).or_default() += 1;
                    if p.reason == "too_many_tokens" {
                        over += 1;
                    }
                    if problems.len() < max_problems {
                        problems.push(p);
                    }
                }
                if r.n_messages > 0 {
                    n_msgs.push(r.n_messages as f64);
                    toks.push(r.tokens as f64);
                    atoks.push(r.assistant_tokens as f64);
                    missing_system += (!r.has_system) as u64;
                    missing_user += (!r.has_user) as u64;
                    billed_per_epoch += r.tokens.min(spec.max_tokens_per_example) as u64;
                }
                dpo_lines += r.dpo as u64;
            }
            pb.set_position(examples);
        }
    }
    pb.finish_and_clear();
    if examples < MIN_EXAMPLES {
        *by_reason.entry("too_few_examples".into()).or_default() += 1;
        problems.push(Problem {
            file: None,
            line: 0,
            reason: "too_few_examples",
            detail: format!("{examples} example(s); at least {MIN_EXAMPLES} are required"),
        });
    }
    let epochs = epochs.unwrap_or_else(|| default_epochs(examples));
    let seconds = start.elapsed().as_secs_f64();
    Ok(ValidationReport {
        command: "validate",
        file: paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
        model: spec.clone(),
        kind: if dpo_lines > 0 { "dpo" } else { "chat" },
        valid: by_reason.is_empty(),
        examples,
        errors,
        errors_by_reason: by_reason,
        problems,
        missing_system,
        missing_user,
        messages_per_example: Distribution::of(&mut n_msgs),
        tokens_per_example: Distribution::of(&mut toks),
        assistant_tokens_per_example: Distribution::of(&mut atoks),
        over_token_limit: over,
        epochs,
        billed_tokens_per_epoch: billed_per_epoch,
        billed_tokens: billed_per_epoch * epochs,
        seconds,
        examples_per_s: examples as f64 / seconds.max(1e-9),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_rule() {
        assert_eq!(default_epochs(10), 10);
        assert_eq!(default_epochs(3), 25);
        assert_eq!(default_epochs(100), 3);
        assert_eq!(default_epochs(10_000), 2);
        assert_eq!(default_epochs(50_000), 1);
    }

    #[test]
    fn quantiles_like_numpy() {
        let d = Distribution::of(&mut [1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!((d.min, d.max, d.mean, d.median), (1.0, 5.0, 3.0, 3.0));
        assert!((d.p5 - 1.2).abs() < 1e-9 && (d.p95 - 4.8).abs() < 1e-9);
    }
}
