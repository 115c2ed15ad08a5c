//! Dataset formats and their mapping from a row (a JSON object) to a canonical conversation: one
//! file per format, over [`fields`] (a row's columns through `--map` renames) and [`message`] (one
//! message from its many spellings). The [`Mapper`] tells a source's format from its columns once,
//! then maps each row.
//!
//! | format | columns |
//! | --- | --- |
//! | alpaca | instruction, output, input (optional), system (optional), history (optional) |
//! | dolly | instruction, response, context (optional) |
//! | sharegpt | conversations: [{from: human/gpt/system/..., value}], system, tools (optional) |
//! | messages | messages: [{role, content, weight?}] (the canonical record itself) |
//! | prompt-completion | prompt, completion |
//! | preference | chosen + rejected, with prompt / messages / conversations, or HH-style transcripts |
//! | text | text |
//! | columns | any columns, through `--prompt` / `--completion` templates or a template file |

pub mod alpaca;
pub mod columns;
pub mod dolly;
pub mod fields;
pub mod message;
pub mod messages;
pub mod preference;
pub mod prompt_completion;
pub mod sharegpt;
pub mod text;

use super::options::{Format, MapOptions};
use crate::accounting::{reason, Reject, RowCtx};
use crate::record::{Conversation, Message};
use crate::template;
use anyhow::{bail, Result};
use fields::Fields;
use serde_json::{Map, Value};
use std::collections::HashMap;

/// What each format needs, for error messages.
pub const FORMAT_HELP: &str = "alpaca: instruction + output (input, system, history optional); \
dolly: instruction + response (context optional); sharegpt: conversations; messages: messages; \
prompt-completion: prompt + completion; preference: chosen + rejected (with prompt, messages or conversations); \
text: text; columns: any columns, with --prompt '{{ column }}' --completion '{{ column }}' or --prompt-template NAME|FILE";

/// Column pairs `--format auto` reads as a prompt and its answer when no format's own names fit,
/// in this order; matched without regard to case.
const SYNONYMS: [(&str, &str); 5] = [
    ("question", "answer"),
    ("query", "response"),
    ("prompt", "response"),
    ("input", "output"),
    ("question", "response"),
];

/// Maps rows of one source to conversations. Built once per input file (format detection).
pub struct Mapper {
    pub format: Format,
    system: Option<String>,
    renames: HashMap<String, String>,
    columns: Option<template::ColumnTemplates>,
    prompts: bool,
    /// Read each row's desirability label (`prepare --method kto`) into `meta.label`.
    labelled: bool,
    /// The (prompt, answer) columns `--format auto` read by synonym, when it did.
    synonym: Option<(String, String)>,
}

impl Mapper {
    /// Builds the mapper for a source whose (first row's) columns are `columns`.
    pub fn new(opts: &MapOptions, columns: &[String], source: &str) -> Result<Mapper> {
        let renames: HashMap<String, String> = opts.renames.iter().cloned().collect();
        let has = |f: &str| has_column(&renames, columns, f);
        let templated = opts.prompt.is_some() || opts.completion.is_some() || opts.template.is_some();
        let auto = opts.format.unwrap_or(Format::Auto) == Format::Auto;
        let synonym =
            if !templated && auto && detect(&has, opts.prompts).is_none() { synonym_pair(columns) } else { None };
        let mut renames = renames;
        if let Some((p, c)) = &synonym {
            renames.insert("prompt".into(), p.clone());
            renames.insert("completion".into(), c.clone());
        }
        let has = |f: &str| has_column(&renames, columns, f);
        let format = match opts.format.unwrap_or(Format::Auto) {
            Format::Auto if templated => Format::Columns,
            Format::Auto if synonym.is_some() => Format::PromptCompletion,
            Format::Auto => detect(&has, opts.prompts).ok_or_else(|| {
                anyhow::anyhow!(
                    "{source}: cannot tell the format from its columns [{}].\nFormats need: {FORMAT_HELP}.\n\
                     Also read as prompt + answer: question/answer, query/response, prompt/response, input/output.\n\
                     Pick one with --format, rename columns with --map field=column, or map your own columns with \
                     --prompt/--completion templates or --prompt-template NAME|FILE.",
                    columns.join(", ")
                )
            })?,
            f => f,
        };
        let columns_tpl = if format == Format::Columns {
            let t = template::ColumnTemplates::new(
                opts.prompt.as_deref(),
                opts.completion.as_deref(),
                opts.template.as_deref(),
                opts.prompts,
            )?;
            t.check_columns(columns, source)?;
            Some(t)
        } else {
            let needed = required(format, opts.prompts);
            let missing: Vec<_> = needed.iter().filter(|f| !has(f)).collect();
            if !missing.is_empty() && opts.format.unwrap_or(Format::Auto) != Format::Auto {
                bail!(
                    "{source}: format '{}' needs column(s) {:?}, but the file has [{}]; rename with --map field=column",
                    format.name(),
                    missing,
                    columns.join(", ")
                );
            }
            None
        };
        Ok(Mapper {
            format,
            system: opts.system.clone(),
            renames,
            columns: columns_tpl,
            prompts: opts.prompts,
            labelled: opts.labelled,
            synonym,
        })
    }

    /// The format as a summary shows it, with the columns a synonym mapping chose.
    pub fn label(&self) -> String {
        match &self.synonym {
            Some((p, c)) => format!("{} (prompt <- {p}, completion <- {c})", self.format.name()),
            None => self.format.name().to_string(),
        }
    }

    /// Maps one row. Errors are rejects naming the row and field.
    pub fn map(&self, row: Map<String, Value>, ctx: &RowCtx) -> Result<Conversation, Reject> {
        let columns = self.prompts.then(|| row_columns(&row));
        let label = if self.labelled { desirability(&row, &self.renames, ctx)? } else { None };
        let fields = Fields { row: &row, renames: &self.renames, prompts: self.prompts };
        let mut conv = match self.format {
            Format::Alpaca => alpaca::map(&fields, ctx)?,
            Format::Dolly => dolly::map(&fields, ctx)?,
            Format::Sharegpt => sharegpt::map(&fields, ctx)?,
            Format::Messages => messages::map(row, &self.renames, ctx)?,
            Format::PromptCompletion => prompt_completion::map(&fields, ctx)?,
            Format::Preference => preference::map(&fields, ctx)?,
            Format::Text => text::map(&fields, ctx)?,
            Format::Columns => columns::map(self.columns.as_ref().expect("columns format has templates"), &row, ctx)?,
            Format::Auto => unreachable!("auto is resolved in Mapper::new"),
        };
        if let Some(l) = label {
            conv.meta.insert("label".into(), Value::Bool(l));
        }
        if let Some(sys) = &self.system {
            if conv.messages.first().map(|m| m.role.as_str()) != Some("system") {
                conv.messages.insert(0, Message::new("system", sys.clone()));
            }
        }
        if let Some(cols) = columns {
            let kept = conv.meta.remove("columns").and_then(|v| v.as_object().cloned()).unwrap_or_default();
            conv.meta.insert("columns".into(), Value::Object(kept.into_iter().chain(cols).collect()));
            return Ok(conv);
        }
        if !conv.is_preference() && !conv.messages.iter().any(|m| m.role == "assistant") {
            return Err(ctx.reject(
                None,
                reason::NO_ASSISTANT,
                "the conversation has no assistant message to train on",
            ));
        }
        Ok(conv)
    }
}

/// Messages followed by the assistant's answer, unless it is empty (a prompt without an answer).
fn with_answer(mut msgs: Vec<Message>, answer: String) -> Vec<Message> {
    if !answer.is_empty() {
        msgs.push(Message::new("assistant", answer));
    }
    msgs
}

/// A row's desirability label (its `label` column, or the one `--map label=COLUMN` names): a
/// boolean, 1/0, or the words true/false, yes/no, 1/0; None when the row has none.
fn desirability(
    row: &Map<String, Value>,
    renames: &HashMap<String, String>,
    ctx: &RowCtx,
) -> Result<Option<bool>, Reject> {
    let col = renames.get("label").map(String::as_str).unwrap_or("label");
    let bad = |v: &Value| {
        ctx.reject(Some(col), reason::WRONG_TYPE, format!("the label must be true or false (or 1/0, yes/no), got {v}"))
    };
    Ok(match row.get(col) {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(v @ Value::Number(n)) => match n.as_u64() {
            Some(1) => Some(true),
            Some(0) => Some(false),
            _ => return Err(bad(v)),
        },
        Some(v @ Value::String(s)) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "1" => Some(true),
            "false" | "no" | "0" => Some(false),
            _ => return Err(bad(v)),
        },
        Some(v) => return Err(bad(v)),
    })
}

/// Every column of a row as text (lists and objects as JSON), for reward functions of prompts.
fn row_columns(row: &Map<String, Value>) -> Map<String, Value> {
    row.iter()
        .filter(|(k, v)| !v.is_null() && !matches!(k.as_str(), "messages" | "conversations" | "conversation" | "meta"))
        .map(|(k, v)| {
            let text = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), Value::String(text))
        })
        .collect()
}

/// Whether the columns hold the format's field `f` (under its `--map` name when renamed).
fn has_column(renames: &HashMap<String, String>, columns: &[String], f: &str) -> bool {
    let c = renames.get(f).map(String::as_str).unwrap_or(f);
    columns.iter().any(|x| x == c)
}

/// The first synonym pair the columns have (their own spelling), if any.
fn synonym_pair(columns: &[String]) -> Option<(String, String)> {
    let find = |name: &str| columns.iter().find(|c| c.trim().eq_ignore_ascii_case(name)).cloned();
    SYNONYMS.iter().find_map(|(p, c)| Some((find(p)?, find(c)?)))
}

fn detect(has: &dyn Fn(&str) -> bool, prompts: bool) -> Option<Format> {
    let pref = (has("chosen") && has("rejected")) || (has("chosen_messages") && has("rejected_messages"));
    Some(if pref {
        Format::Preference
    } else if has("messages") {
        Format::Messages
    } else if has("conversations") || has("conversation") {
        Format::Sharegpt
    } else if has("instruction") && has("output") {
        Format::Alpaca
    } else if has("instruction") && has("response") {
        Format::Dolly
    } else if has("prompt") && (has("completion") || prompts) {
        Format::PromptCompletion
    } else if prompts && has("instruction") {
        Format::Alpaca
    } else if has("text") {
        Format::Text
    } else {
        return None;
    })
}

fn required(f: Format, prompts: bool) -> &'static [&'static str] {
    match f {
        Format::Alpaca | Format::Dolly if prompts => &["instruction"],
        Format::PromptCompletion if prompts => &["prompt"],
        Format::Alpaca => &["instruction", "output"],
        Format::Dolly => &["instruction", "response"],
        Format::Messages => &["messages"],
        Format::PromptCompletion => &["prompt", "completion"],
        Format::Text => &["text"],
        Format::Preference => &["chosen", "rejected"],
        _ => &[],
    }
}
