//! OpenAI fine-tuning JSONL lines from canonical conversations. SFT lines are
//! `{"messages": [...], "tools"?: [...]}`; DPO lines are `{"input": {"messages": [...]},
//! "preferred_output": [...], "non_preferred_output": [...]}`. [`fit_example`] makes the line of a
//! conversation within the model's token limit (dropping it, or removing whole trailing turns);
//! [`RollingJsonl`] rolls files over before the platform's upload size limit.

use super::tokens::{count_messages, ModelSpec};
use crate::accounting::reason;
use crate::output::AtomicFile;
use crate::record::{Conversation, Message};
use anyhow::Result;
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportMethod {
    Sft,
    Dpo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OverLimit {
    /// Drop the example (written to rejects.jsonl).
    Drop,
    /// Remove whole turns from the end until it fits and still ends with an assistant answer.
    Truncate,
}

/// A JSONL output that rolls over to `stem-00001.jsonl`, ... before `max` bytes.
pub struct RollingJsonl {
    base: PathBuf,
    max: u64,
    current: Option<(AtomicFile, u64)>,
    files: Vec<PathBuf>,
    pub lines: u64,
}

impl RollingJsonl {
    pub fn new(base: PathBuf, max: u64) -> Self {
        RollingJsonl { base, max, current: None, files: Vec::new(), lines: 0 }
    }
    fn path(&self, i: usize) -> PathBuf {
        if i == 0 {
            return self.base.clone();
        }
        let stem = self.base.file_stem().unwrap_or_default().to_string_lossy();
        let ext = self.base.extension().map(|e| e.to_string_lossy().to_string()).unwrap_or_else(|| "jsonl".into());
        self.base.with_file_name(format!("{stem}-{i:05}.{ext}"))
    }
    pub fn write(&mut self, line: &[u8]) -> Result<()> {
        if let Some((_, n)) = &self.current {
            if n + line.len() as u64 > self.max {
                let (f, _) = self.current.take().expect("checked");
                f.commit()?;
            }
        }
        if self.current.is_none() {
            let p = self.path(self.files.len());
            self.current = Some((AtomicFile::create(&p)?, 0));
            self.files.push(p);
        }
        let (f, n) = self.current.as_mut().expect("opened");
        f.write_all(line)?;
        *n += line.len() as u64;
        self.lines += 1;
        Ok(())
    }
    pub fn finish(mut self) -> Result<Vec<String>> {
        if let Some((f, _)) = self.current.take() {
            f.commit()?;
        }
        Ok(self.files.iter().map(|p| p.display().to_string()).collect())
    }
}

fn message_json(m: &Message) -> Value {
    let mut o = Map::new();
    o.insert("role".into(), Value::from(m.role.as_str()));
    let has_calls = m.extra.contains_key("tool_calls");
    if !(has_calls && m.content.is_empty()) {
        o.insert("content".into(), Value::from(m.content.as_str()));
    }
    for k in ["name", "tool_calls", "tool_call_id", "function_call"] {
        if let Some(v) = m.extra.get(k) {
            let v = if k == "tool_calls" { normalize_tool_calls(v) } else { v.clone() };
            o.insert(k.into(), v);
        }
    }
    if m.role == "assistant" {
        if let Some(w) = m.weight {
            o.insert("weight".into(), Value::from(w));
        }
    }
    Value::Object(o)
}

/// OpenAI wants tool call arguments as a JSON string.
fn normalize_tool_calls(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(list) = v.as_array_mut() {
        for call in list {
            if let Some(args) = call.get_mut("function").and_then(|f| f.get_mut("arguments")) {
                if !args.is_string() {
                    *args = Value::from(args.to_string());
                }
            }
        }
    }
    v
}

/// The line for one conversation, or a reject reason.
fn example(c: &Conversation, method: ExportMethod) -> Result<(Value, Vec<Value>), (&'static str, String)> {
    let msgs: Vec<Value> = c.messages.iter().map(message_json).collect();
    match method {
        ExportMethod::Sft => {
            if c.is_text() {
                return Err((reason::NO_ASSISTANT, "raw-text records have no chat turns to export".into()));
            }
            if c.is_preference() {
                // A preference pair exports as SFT on its chosen answer.
                let mut m = msgs.clone();
                m.push(message_json(c.chosen.as_ref().expect("pair")));
                return Ok((line_json(&m, c.tools.as_ref()), m));
            }
            Ok((line_json(&msgs, c.tools.as_ref()), msgs))
        }
        ExportMethod::Dpo => {
            let (Some(ch), Some(rj)) = (&c.chosen, &c.rejected) else {
                return Err((
                    reason::NOT_PREFERENCE,
                    "--method dpo needs preference records (chosen and rejected)".into(),
                ));
            };
            let mut input = json!({"messages": msgs});
            if let Some(t) = &c.tools {
                input["tools"] = t.clone();
            }
            let line = json!({
                "input": input,
                "preferred_output": [{"role": "assistant", "content": ch.content}],
                "non_preferred_output": [{"role": "assistant", "content": rj.content}],
            });
            let mut counted = msgs;
            counted.push(json!({"role": "assistant", "content": ch.content}));
            Ok((line, counted))
        }
    }
}

fn line_json(msgs: &[Value], tools: Option<&Value>) -> Value {
    let mut o = json!({"messages": msgs});
    if let Some(t) = tools {
        o["tools"] = t.clone();
    }
    o
}

/// Removes trailing turns until the example fits; it must still end with an assistant message.
fn truncate_to_fit(c: &Conversation, spec: &ModelSpec) -> Option<Conversation> {
    let mut c = c.clone();
    loop {
        while c.messages.last().is_some_and(|m| m.role != "assistant") {
            c.messages.pop();
        }
        if c.messages.len() < 2 {
            return None;
        }
        let msgs: Vec<Value> = c.messages.iter().map(message_json).collect();
        if count_messages(spec.encoding, &msgs).0 <= spec.max_tokens_per_example {
            return Some(c);
        }
        c.messages.pop();
    }
}

/// `train.jsonl` -> `train_validation.jsonl`.
pub fn validation_path(out: &Path) -> PathBuf {
    let stem = out.file_stem().unwrap_or_default().to_string_lossy();
    out.with_file_name(format!("{stem}_validation.jsonl"))
}

/// The JSONL line (without its newline) of a conversation within the model's token limit, its
/// token count and whether turns were removed to fit; or why it cannot be exported.
pub fn fit_example(
    c: &Conversation,
    method: ExportMethod,
    spec: &ModelSpec,
    over_limit: OverLimit,
) -> Result<(Vec<u8>, usize, bool), (&'static str, String)> {
    let (line, counted) = example(c, method)?;
    let n = count_messages(spec.encoding, &counted).0;
    if n <= spec.max_tokens_per_example {
        return Ok((serde_json::to_vec(&line).expect("json"), n, false));
    }
    let over =
        (reason::OVER_TOKEN_LIMIT, format!("{n} tokens > {} allowed for {}", spec.max_tokens_per_example, spec.model));
    if over_limit == OverLimit::Drop || method == ExportMethod::Dpo {
        return Err(over);
    }
    let short = truncate_to_fit(c, spec).ok_or(over)?;
    let (line, counted) = example(&short, method)?;
    Ok((serde_json::to_vec(&line).expect("json"), count_messages(spec.encoding, &counted).0, true))
}
