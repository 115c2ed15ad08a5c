//! Dataset formats and their mapping from a row (a JSON object) to a canonical conversation.
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

use super::rows::json_kind;
use super::Item;
use crate::accounting::{reason, Reject, RowCtx};
use crate::quality::decontaminate::Contamination;
use crate::record::{Conversation, Message};
use crate::template;
use anyhow::{bail, Result};
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    Auto,
    Alpaca,
    Dolly,
    Sharegpt,
    Messages,
    PromptCompletion,
    Preference,
    Text,
    Columns,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Auto => "auto",
            Format::Alpaca => "alpaca",
            Format::Dolly => "dolly",
            Format::Sharegpt => "sharegpt",
            Format::Messages => "messages",
            Format::PromptCompletion => "prompt-completion",
            Format::Preference => "preference",
            Format::Text => "text",
            Format::Columns => "columns",
        }
    }
}

/// What each format needs, for error messages.
pub const FORMAT_HELP: &str = "alpaca: instruction + output (input, system, history optional); \
dolly: instruction + response (context optional); sharegpt: conversations; messages: messages; \
prompt-completion: prompt + completion; preference: chosen + rejected (with prompt, messages or conversations); \
text: text; columns: any columns, with --prompt '{{ column }}' --completion '{{ column }}' or --prompt-template NAME|FILE";

/// User options that shape the mapping.
#[derive(Debug, Clone, Default)]
pub struct MapOptions {
    pub format: Option<Format>,
    /// A system message added to every conversation that has none.
    pub system: Option<String>,
    /// `field=column` renames: read the format's `field` from the row's `column`.
    pub renames: Vec<(String, String)>,
    /// minijinja templates over the row's columns (columns format).
    pub prompt: Option<String>,
    pub completion: Option<String>,
    /// A built-in prompt template name or a path to a `.jinja` file with prompt/completion blocks.
    pub template: Option<String>,
    /// Rows become prompts for online RL (`prepare --method prompts`): the answer is optional, and
    /// every column of the row is kept, as text, in `meta.columns` for reward functions.
    pub prompts: bool,
    /// How files' bytes are read (delimiter, encoding, sheet).
    pub read: crate::ingest::read::ReadOptions,
    /// Which rows: a `--sql` query, `--limit`, `--sample` (the table path when any is set).
    pub select: crate::ingest::table::Selection,
    /// Quality filters every mapped conversation must pass.
    pub quality: crate::quality::Quality,
    /// This rank's share of the batches in a sharded run (`--rank/--world-size`); all when None.
    pub share: Option<crate::cluster::launch::Share>,
}

/// Column pairs `--format auto` reads as a prompt and its answer when no format's own names fit,
/// in this order; matched without regard to case.
const SYNONYMS: [(&str, &str); 5] = [
    ("question", "answer"),
    ("query", "response"),
    ("prompt", "response"),
    ("input", "output"),
    ("question", "response"),
];

impl MapOptions {
    pub fn parse_renames(spec: &[String]) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for part in spec.iter().flat_map(|s| s.split(',')) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            match part.split_once('=') {
                Some((f, c)) if !f.trim().is_empty() && !c.trim().is_empty() => {
                    out.push((f.trim().to_string(), c.trim().to_string()))
                }
                _ => bail!("--map expects field=column pairs separated by commas, got '{part}'"),
            }
        }
        Ok(out)
    }
}

/// Maps rows of one source to conversations. Built once per input file (format detection).
pub struct Mapper {
    pub format: Format,
    system: Option<String>,
    renames: HashMap<String, String>,
    columns: Option<template::ColumnTemplates>,
    prompts: bool,
    /// The (prompt, answer) columns `--format auto` read by synonym, when it did.
    synonym: Option<(String, String)>,
    quality: crate::quality::Quality,
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
            synonym,
            quality: opts.quality.clone(),
        })
    }

    /// The format as a summary shows it, with the columns a synonym mapping chose.
    pub fn label(&self) -> String {
        match &self.synonym {
            Some((p, c)) => format!("{} (prompt <- {p}, completion <- {c})", self.format.name()),
            None => self.format.name().to_string(),
        }
    }

    fn get<'a>(&self, row: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
        match self.renames.get(field) {
            Some(c) => row.get(c),
            None => row.get(field),
        }
    }

    /// Required text field: present, a string (or a scalar, stringified), non-empty.
    fn text(&self, row: &Map<String, Value>, field: &str, ctx: &RowCtx) -> Result<String, Reject> {
        let col = self.renames.get(field).map(String::as_str).unwrap_or(field);
        match self.get(row, field) {
            None | Some(Value::Null) => {
                Err(ctx.reject(Some(col), reason::MISSING_FIELD, format!("required field '{col}' is missing")))
            }
            Some(v) => {
                let s = scalar_text(v)
                    .map_err(|k| ctx.reject(Some(col), reason::WRONG_TYPE, format!("expected text, found {k}")))?;
                if s.trim().is_empty() {
                    Err(ctx.reject(Some(col), reason::EMPTY_FIELD, format!("field '{col}' is empty")))
                } else {
                    Ok(s)
                }
            }
        }
    }

    /// The answer field: required text, or optional for prompts ("" when absent).
    fn answer(&self, row: &Map<String, Value>, field: &str, ctx: &RowCtx) -> Result<String, Reject> {
        if self.prompts {
            self.opt_text(row, field, ctx)
        } else {
            self.text(row, field, ctx)
        }
    }

    /// Optional text field: missing/null/empty give "".
    fn opt_text(&self, row: &Map<String, Value>, field: &str, ctx: &RowCtx) -> Result<String, Reject> {
        match self.get(row, field) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(v) => scalar_text(v)
                .map_err(|k| ctx.reject(Some(field), reason::WRONG_TYPE, format!("expected text, found {k}"))),
        }
    }

    /// Maps one row. Errors are rejects naming the row and field.
    pub fn map(&self, row: Map<String, Value>, ctx: &RowCtx) -> Result<Conversation, Reject> {
        let columns = self.prompts.then(|| row_columns(&row));
        let mut conv = match self.format {
            Format::Alpaca => self.alpaca(&row, ctx, "output")?,
            Format::Dolly => self.dolly(&row, ctx)?,
            Format::Sharegpt => self.sharegpt(&row, ctx)?,
            Format::Messages => self.messages(row, ctx)?,
            Format::PromptCompletion => {
                let p = self.text(&row, "prompt", ctx)?;
                let c = self.answer(&row, "completion", ctx)?;
                Conversation::new(ctx.id(), with_answer(vec![Message::new("user", p)], c))
            }
            Format::Preference => self.preference(&row, ctx)?,
            Format::Text => {
                let t = self.text(&row, "text", ctx)?;
                let mut c = Conversation::new(ctx.id(), vec![Message::new("assistant", t)]);
                c.meta.insert("format".into(), Value::from("text"));
                c
            }
            Format::Columns => {
                let t = self.columns.as_ref().expect("columns format has templates");
                let (system, prompt, completion) = t.render(&row, ctx)?;
                let mut msgs = Vec::with_capacity(3);
                if !system.trim().is_empty() {
                    msgs.push(Message::new("system", system));
                }
                msgs.push(Message::new("user", prompt));
                Conversation::new(ctx.id(), with_answer(msgs, completion))
            }
            Format::Auto => unreachable!("auto is resolved in Mapper::new"),
        };
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

    /// Maps one row and decides its fate: rejected (unreadable, or failing a quality filter),
    /// contaminated (overlapping an evaluation set), or kept.
    pub fn item(&self, row: Map<String, Value>, ctx: &RowCtx) -> Item {
        let conv = match self.map(row, ctx) {
            Ok(c) => c,
            Err(r) => return Item::Rejected(r),
        };
        if let Some((side, o)) = self.quality.contamination(&conv) {
            let n = self.quality.decontaminate.as_ref().map_or(0, |i| i.n());
            return Item::Contaminated(Box::new(Contamination::new(ctx, side, o, n, conv)));
        }
        // Prompts for online RL have no answers to filter on.
        if !self.prompts {
            if let Err((why, detail)) = self.quality.check(&conv) {
                return Item::Rejected(ctx.reject(None, why, detail));
            }
        }
        Item::Ok(conv)
    }

    fn alpaca(&self, row: &Map<String, Value>, ctx: &RowCtx, answer: &str) -> Result<Conversation, Reject> {
        let instruction = self.text(row, "instruction", ctx)?;
        let input = self.opt_text(row, "input", ctx)?;
        let output = self.answer(row, answer, ctx)?;
        let mut msgs = Vec::with_capacity(4);
        let system = self.opt_text(row, "system", ctx)?;
        if !system.trim().is_empty() {
            msgs.push(Message::new("system", system));
        }
        if let Some(Value::Array(hist)) = self.get(row, "history") {
            for (i, turn) in hist.iter().enumerate() {
                let pair = turn.as_array().filter(|p| p.len() == 2);
                let (q, a) = match pair.map(|p| (p[0].as_str(), p[1].as_str())) {
                    Some((Some(q), Some(a))) => (q, a),
                    _ => {
                        return Err(ctx.reject(
                            Some("history"),
                            reason::WRONG_TYPE,
                            format!("history[{i}] must be a [question, answer] pair of strings"),
                        ))
                    }
                };
                msgs.push(Message::new("user", q));
                msgs.push(Message::new("assistant", a));
            }
        }
        let user = if input.trim().is_empty() { instruction } else { format!("{instruction}\n{input}") };
        msgs.push(Message::new("user", user));
        Ok(Conversation::new(ctx.id(), with_answer(msgs, output)))
    }

    fn dolly(&self, row: &Map<String, Value>, ctx: &RowCtx) -> Result<Conversation, Reject> {
        let instruction = self.text(row, "instruction", ctx)?;
        let context = self.opt_text(row, "context", ctx)?;
        let response = self.answer(row, "response", ctx)?;
        let user = if context.trim().is_empty() { instruction } else { format!("{instruction}\n\n{context}") };
        Ok(Conversation::new(ctx.id(), with_answer(vec![Message::new("user", user)], response)))
    }

    fn sharegpt(&self, row: &Map<String, Value>, ctx: &RowCtx) -> Result<Conversation, Reject> {
        let field = if self.get(row, "conversations").is_some() { "conversations" } else { "conversation" };
        let turns = self.list(row, field, ctx)?;
        let mut msgs = Vec::with_capacity(turns.len() + 1);
        let system = self.opt_text(row, "system", ctx)?;
        if !system.trim().is_empty() {
            msgs.push(Message::new("system", system));
        }
        for (i, t) in turns.iter().enumerate() {
            msgs.push(sharegpt_turn(t, i, field, ctx)?);
        }
        let mut conv = Conversation::new(ctx.id(), msgs);
        conv.tools = self.tools(row, ctx)?;
        check_messages(&conv.messages, field, ctx)?;
        Ok(conv)
    }

    fn tools(&self, row: &Map<String, Value>, ctx: &RowCtx) -> Result<Option<Value>, Reject> {
        match self.get(row, "tools") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
            Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
                Ok(v @ Value::Array(_)) => Ok(Some(normalize_tools(v))),
                _ => Err(ctx.reject(
                    Some("tools"),
                    reason::WRONG_TYPE,
                    "tools must be a JSON list of function definitions",
                )),
            },
            Some(v @ Value::Array(_)) => Ok(Some(normalize_tools(v.clone()))),
            Some(v) => Err(ctx.reject(
                Some("tools"),
                reason::WRONG_TYPE,
                format!("tools must be a list, found {}", json_kind(v)),
            )),
        }
    }

    fn list<'a>(&self, row: &'a Map<String, Value>, field: &str, ctx: &RowCtx) -> Result<&'a Vec<Value>, Reject> {
        match self.get(row, field) {
            Some(Value::Array(a)) if !a.is_empty() => Ok(a),
            Some(Value::Array(_)) => {
                Err(ctx.reject(Some(field), reason::EMPTY_FIELD, format!("'{field}' is an empty list")))
            }
            Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
                // CSV cells holding JSON lists are common; accept them.
                Ok(Value::Array(_)) => Err(ctx.reject(
                    Some(field),
                    reason::WRONG_TYPE,
                    format!("'{field}' holds JSON text; convert from a JSON/JSONL/Parquet file so it is a real list"),
                )),
                _ => Err(ctx.reject(
                    Some(field),
                    reason::WRONG_TYPE,
                    format!("'{field}' must be a list of messages, found a string"),
                )),
            },
            None | Some(Value::Null) => {
                Err(ctx.reject(Some(field), reason::MISSING_FIELD, format!("required field '{field}' is missing")))
            }
            Some(v) => Err(ctx.reject(
                Some(field),
                reason::WRONG_TYPE,
                format!("'{field}' must be a list of messages, found {}", json_kind(v)),
            )),
        }
    }

    fn messages(&self, mut row: Map<String, Value>, ctx: &RowCtx) -> Result<Conversation, Reject> {
        let list = self.list(&row, "messages", ctx)?;
        let mut msgs = Vec::with_capacity(list.len());
        for (i, m) in list.iter().enumerate() {
            msgs.push(openai_message(m, i, "messages", ctx)?);
        }
        check_messages(&msgs, "messages", ctx)?;
        // A canonical record keeps its id and meta, so conversions compose.
        let id = match row.remove("id") {
            Some(Value::String(s)) if !s.is_empty() => s,
            _ => ctx.id(),
        };
        let mut conv = Conversation::new(id, msgs);
        match row.remove("meta") {
            Some(Value::Object(meta)) => conv.meta = meta,
            // Parquet conversation tables store meta as JSON text.
            Some(Value::String(s)) => {
                if let Ok(Value::Object(meta)) = serde_json::from_str(&s) {
                    conv.meta = meta;
                }
            }
            _ => {}
        }
        conv.tools = self.tools(&row, ctx)?;
        for side in ["chosen", "rejected"] {
            if let Some(v) = row.get(side).filter(|v| !v.is_null()) {
                let m = openai_message(v, 0, side, ctx)?;
                if side == "chosen" {
                    conv.chosen = Some(m)
                } else {
                    conv.rejected = Some(m)
                }
            }
        }
        Ok(conv)
    }

    fn preference(&self, row: &Map<String, Value>, ctx: &RowCtx) -> Result<Conversation, Reject> {
        // Prompt: messages / conversations / prompt (string or messages); HH transcripts have none.
        let mut prompt: Vec<Message> = Vec::new();
        let system = self.opt_text(row, "system", ctx)?;
        if !system.trim().is_empty() {
            prompt.push(Message::new("system", system));
        }
        let chosen_v = self.get(row, "chosen").or_else(|| self.get(row, "chosen_messages"));
        let rejected_v = self.get(row, "rejected").or_else(|| self.get(row, "rejected_messages"));
        let (Some(chosen_v), Some(rejected_v)) = (chosen_v, rejected_v) else {
            return Err(ctx.reject(
                Some("chosen"),
                reason::NOT_PREFERENCE,
                "a preference row needs both 'chosen' and 'rejected'",
            ));
        };
        if let Some(Value::Array(turns)) = self.get(row, "conversations") {
            for (i, t) in turns.iter().enumerate() {
                prompt.push(sharegpt_turn(t, i, "conversations", ctx)?);
            }
        } else if let Some(Value::Array(list)) = self.get(row, "messages") {
            for (i, m) in list.iter().enumerate() {
                prompt.push(openai_message(m, i, "messages", ctx)?);
            }
        } else if let Some(p) =
            self.get(row, "prompt").or_else(|| self.get(row, "question")).or_else(|| self.get(row, "instruction"))
        {
            match p {
                Value::Array(list) => {
                    for (i, m) in list.iter().enumerate() {
                        prompt.push(openai_message(m, i, "prompt", ctx)?);
                    }
                }
                v => {
                    let s = scalar_text(v).map_err(|k| {
                        ctx.reject(Some("prompt"), reason::WRONG_TYPE, format!("expected text, found {k}"))
                    })?;
                    if s.trim().is_empty() {
                        return Err(ctx.reject(Some("prompt"), reason::EMPTY_FIELD, "field 'prompt' is empty"));
                    }
                    prompt.push(Message::new("user", s));
                }
            }
        }
        let mut chosen = answer_turns(chosen_v, "chosen", ctx)?;
        let mut rejected = answer_turns(rejected_v, "rejected", ctx)?;
        // Full transcripts (HH-RLHF, TRL conversational): the shared prefix is the prompt.
        if chosen.len() > 1 || rejected.len() > 1 {
            let common = chosen.iter().zip(rejected.iter()).take_while(|(a, b)| a == b).count();
            let shared: Vec<Message> = chosen[..common].to_vec();
            chosen.drain(..common);
            rejected.drain(..common);
            prompt.extend(shared);
        }
        if chosen.len() != 1 || rejected.len() != 1 {
            return Err(ctx.reject(
                Some("chosen"),
                reason::NOT_PREFERENCE,
                "chosen and rejected must differ in exactly one final assistant answer",
            ));
        }
        let (c, r) = (chosen.remove(0), rejected.remove(0));
        if c.role != "assistant" || r.role != "assistant" {
            return Err(ctx.reject(
                Some("chosen"),
                reason::NOT_PREFERENCE,
                "chosen and rejected must be assistant answers",
            ));
        }
        if prompt.iter().all(|m| m.role == "system") {
            return Err(ctx.reject(
                Some("prompt"),
                reason::MISSING_FIELD,
                "a preference pair needs a prompt (prompt, messages or conversations)",
            ));
        }
        let mut conv = Conversation::new(ctx.id(), prompt);
        conv.chosen = Some(c);
        conv.rejected = Some(r);
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

/// A scalar as text: strings as they are, numbers and booleans stringified; lists/objects refused.
pub fn scalar_text(v: &Value) -> Result<String, &'static str> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Null => Ok(String::new()),
        other => Err(json_kind(other)),
    }
}

/// Message content: a string, or a list of parts ({type: text, text|value}) joined.
fn content_text(v: Option<&Value>, ctx: &RowCtx, field: &str) -> Result<String, Reject> {
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut s = String::new();
            for p in parts {
                match p {
                    Value::String(t) => s.push_str(t),
                    Value::Object(o) if o.get("type").and_then(Value::as_str).unwrap_or("text") == "text" => {
                        match o.get("text").or_else(|| o.get("value")) {
                            Some(Value::String(t)) => s.push_str(t),
                            _ => {
                                return Err(ctx.reject(
                                    Some(field),
                                    reason::WRONG_TYPE,
                                    "a text content part has no 'text' string",
                                ))
                            }
                        }
                    }
                    _ => {
                        return Err(ctx.reject(
                            Some(field),
                            reason::WRONG_TYPE,
                            "only text content parts are supported",
                        ))
                    }
                }
            }
            Ok(s)
        }
        Some(v @ Value::Number(_)) | Some(v @ Value::Bool(_)) => Ok(v.to_string()),
        Some(v) => {
            Err(ctx.reject(Some(field), reason::WRONG_TYPE, format!("content must be text, found {}", json_kind(v))))
        }
    }
}

fn norm_role(r: &str) -> Option<&'static str> {
    Some(match r {
        "system" | "developer" => "system",
        "user" | "human" => "user",
        "assistant" | "gpt" | "model" | "chatgpt" | "bard" | "bing" | "bot" => "assistant",
        "tool" | "observation" | "function" | "ipython" => "tool",
        _ => return None,
    })
}

fn sharegpt_turn(t: &Value, i: usize, field: &str, ctx: &RowCtx) -> Result<Message, Reject> {
    let fname = format!("{field}[{i}]");
    let Value::Object(o) = t else {
        return Err(ctx.reject(
            Some(&fname),
            reason::WRONG_TYPE,
            format!("a turn must be an object, found {}", json_kind(t)),
        ));
    };
    let from = o.get("from").or_else(|| o.get("role")).and_then(Value::as_str).unwrap_or("");
    let content = content_text(o.get("value").or_else(|| o.get("content")), ctx, &fname)?;
    if from == "function_call" {
        // A tool call by the assistant: {"name": ..., "arguments": {...}}.
        let call: Value = serde_json::from_str(&content).map_err(|_| {
            ctx.reject(Some(&fname), reason::WRONG_TYPE, "function_call value must be JSON {name, arguments}")
        })?;
        let name = call.get("name").cloned().unwrap_or(Value::Null);
        let args = match call.get("arguments") {
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => "{}".into(),
        };
        let mut m = Message::new("assistant", "");
        m.extra.insert(
            "tool_calls".into(),
            serde_json::json!([{"id": format!("call_{i}"), "type": "function", "function": {"name": name, "arguments": args}}]),
        );
        return Ok(m);
    }
    let role = norm_role(from).ok_or_else(|| {
        ctx.reject(Some(&fname), reason::BAD_ROLE, format!("unknown speaker '{from}' (expected human/user, gpt/assistant, system, function_call, observation/tool)"))
    })?;
    let mut m = Message::new(role, content);
    if role == "tool" && i > 0 {
        m.extra.insert("tool_call_id".into(), Value::from(format!("call_{}", i - 1)));
    }
    Ok(m)
}

fn openai_message(v: &Value, i: usize, field: &str, ctx: &RowCtx) -> Result<Message, Reject> {
    let fname = format!("{field}[{i}]");
    let Value::Object(o) = v else {
        return Err(ctx.reject(
            Some(&fname),
            reason::WRONG_TYPE,
            format!("a message must be an object, found {}", json_kind(v)),
        ));
    };
    let role_raw = match o.get("role").or_else(|| o.get("from")) {
        Some(Value::String(r)) => r.as_str(),
        _ => return Err(ctx.reject(Some(&fname), reason::MISSING_FIELD, "message has no 'role'")),
    };
    let role = norm_role(role_raw).ok_or_else(|| {
        ctx.reject(
            Some(&fname),
            reason::BAD_ROLE,
            format!("unknown role '{role_raw}' (expected system, user, assistant, tool)"),
        )
    })?;
    let content = content_text(o.get("content").or_else(|| o.get("value")), ctx, &fname)?;
    let mut m = Message::new(role, content);
    let w = o.get("weight").or_else(|| o.get("loss_weight")).filter(|w| !w.is_null());
    if let Some(w) = w {
        m.weight = match w.as_f64() {
            Some(0.0) => Some(0),
            Some(1.0) => Some(1),
            _ => return Err(ctx.reject(Some(&fname), reason::WRONG_TYPE, format!("weight must be 0 or 1, found {w}"))),
        };
        if role != "assistant" {
            m.weight = None; // only assistant weights mean anything (loss_weight 0 on prompts)
        }
    }
    for k in ["name", "tool_calls", "tool_call_id", "function_call"] {
        if let Some(x) = o.get(k).filter(|x| !x.is_null()) {
            m.extra.insert(k.to_string(), x.clone());
        }
    }
    Ok(m)
}

/// `chosen`/`rejected`: a string, a single message, or a whole transcript (list or HH text).
fn answer_turns(v: &Value, field: &str, ctx: &RowCtx) -> Result<Vec<Message>, Reject> {
    match v {
        Value::String(s) if s.contains("\n\nHuman:") && s.contains("\n\nAssistant:") => Ok(hh_turns(s)),
        Value::String(s) if s.trim().is_empty() => {
            Err(ctx.reject(Some(field), reason::EMPTY_FIELD, format!("'{field}' is empty")))
        }
        Value::String(s) => Ok(vec![Message::new("assistant", s.clone())]),
        Value::Object(_) => Ok(vec![sharegpt_turn(v, 0, field, ctx)?]),
        Value::Array(list) => list.iter().enumerate().map(|(i, m)| openai_message(m, i, field, ctx)).collect(),
        other => Err(ctx.reject(
            Some(field),
            reason::WRONG_TYPE,
            format!("'{field}' must be text or messages, found {}", json_kind(other)),
        )),
    }
}

/// Splits an Anthropic HH-RLHF transcript ("\n\nHuman: ...\n\nAssistant: ...") into messages.
fn hh_turns(s: &str) -> Vec<Message> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(pos) = next_marker(rest) {
        let (role, skip) = if rest[pos..].starts_with("\n\nHuman:") { ("user", 8) } else { ("assistant", 12) };
        rest = &rest[pos + skip..];
        let end = next_marker(rest).unwrap_or(rest.len());
        out.push(Message::new(role, rest[..end].trim().to_string()));
        rest = &rest[end..];
    }
    out
}

fn next_marker(s: &str) -> Option<usize> {
    match (s.find("\n\nHuman:"), s.find("\n\nAssistant:")) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Tools in OpenAI form: `[{"type":"function","function":{...}}]`.
fn normalize_tools(v: Value) -> Value {
    match v {
        Value::Array(items) => {
            Value::Array(
                items
                    .into_iter()
                    .map(|t| {
                        if t.get("type").is_some() {
                            t
                        } else {
                            serde_json::json!({"type": "function", "function": t})
                        }
                    })
                    .collect(),
            )
        }
        v => v,
    }
}

fn check_messages(msgs: &[Message], field: &str, ctx: &RowCtx) -> Result<(), Reject> {
    for (i, m) in msgs.iter().enumerate() {
        let empty = m.content.trim().is_empty()
            && !m.extra.contains_key("tool_calls")
            && !m.extra.contains_key("function_call");
        if empty {
            return Err(ctx.reject(
                Some(&format!("{field}[{i}]")),
                reason::EMPTY_FIELD,
                format!("{} message {i} has empty content", m.role),
            ));
        }
    }
    Ok(())
}
