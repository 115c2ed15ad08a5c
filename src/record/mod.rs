//! The canonical record shared by convert, dedup, export and prepare: one conversation in the
//! OpenAI chat schema plus a traceable `id` and free-form `meta`.
//!
//! Preference records carry the shared prompt in `messages` and the two answers in `chosen` and
//! `rejected`. Raw-text records (completion-style training) are one assistant message with
//! `meta.format == "text"`.
//!
//! [`sink`] writes conversations as JSONL or Parquet ([`table`], which also reads them back).

pub mod sink;
pub mod table;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One chat message. Unknown OpenAI fields (name, tool_calls, tool_call_id, ...) are kept in `extra`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// 0 = do not train on this message, 1 = train (assistant messages only); absent = default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u8>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Message { role: role.to_string(), content: content.into(), weight: None, extra: Map::new() }
    }
    /// Whether this message is trained when the loss covers assistant messages.
    pub fn trainable(&self) -> bool {
        self.role == "assistant" && self.weight != Some(0)
    }
}

/// One conversation (or preference pair), the unit every stage passes on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    pub messages: Vec<Message>,
    #[serde(default)]
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen: Option<Message>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<Message>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Value>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub meta: Map<String, Value>,
}

impl Conversation {
    pub fn new(id: String, messages: Vec<Message>) -> Self {
        Conversation { messages, id, chosen: None, rejected: None, tools: None, meta: Map::new() }
    }
    pub fn is_preference(&self) -> bool {
        self.chosen.is_some() && self.rejected.is_some()
    }
    pub fn is_text(&self) -> bool {
        self.meta.get("format").and_then(Value::as_str) == Some("text")
    }
    /// Text of the prompt side (system + user messages), used as a dedup key.
    pub fn prompt_text(&self) -> String {
        join_contents(self.messages.iter().filter(|m| m.role != "assistant"))
    }
    /// Text of the answers (assistant messages, chosen answer), used as a dedup key.
    pub fn completion_text(&self) -> String {
        let mut s = join_contents(self.messages.iter().filter(|m| m.role == "assistant"));
        if let Some(c) = &self.chosen {
            s.push('\n');
            s.push_str(&c.content);
        }
        s
    }
    /// All text of the conversation with role markers, used as the default dedup key.
    pub fn full_text(&self) -> String {
        let mut s = String::new();
        for m in self.messages.iter().chain(self.chosen.iter()).chain(self.rejected.iter()) {
            s.push_str(&m.role);
            s.push_str(": ");
            s.push_str(&m.content);
            s.push('\n');
        }
        s
    }
}

fn join_contents<'a>(msgs: impl Iterator<Item = &'a Message>) -> String {
    let mut s = String::new();
    for m in msgs {
        if !s.is_empty() {
            s.push('\n');
        }
        s.push_str(&m.content);
    }
    s
}
