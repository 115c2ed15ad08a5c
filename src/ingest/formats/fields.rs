//! A row's fields as a format reads them: through the `--map field=column` renames, required or
//! optional text with the reject that names the column, lists of messages, and tool definitions.

use crate::accounting::{reason, Reject, RowCtx};
use crate::ingest::rows::json_kind;
use serde_json::{Map, Value};
use std::collections::HashMap;

/// One row and how to read it.
pub struct Fields<'a> {
    pub row: &'a Map<String, Value>,
    pub renames: &'a HashMap<String, String>,
    /// Rows are prompts for online RL: answers are optional.
    pub prompts: bool,
}

impl<'a> Fields<'a> {
    pub fn get(&self, field: &str) -> Option<&'a Value> {
        match self.renames.get(field) {
            Some(c) => self.row.get(c),
            None => self.row.get(field),
        }
    }

    /// Required text field: present, a string (or a scalar, stringified), non-empty.
    pub fn text(&self, field: &str, ctx: &RowCtx) -> Result<String, Reject> {
        let col = self.renames.get(field).map(String::as_str).unwrap_or(field);
        match self.get(field) {
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
    pub fn answer(&self, field: &str, ctx: &RowCtx) -> Result<String, Reject> {
        if self.prompts {
            self.opt_text(field, ctx)
        } else {
            self.text(field, ctx)
        }
    }

    /// Optional text field: missing/null/empty give "".
    pub fn opt_text(&self, field: &str, ctx: &RowCtx) -> Result<String, Reject> {
        match self.get(field) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(v) => scalar_text(v)
                .map_err(|k| ctx.reject(Some(field), reason::WRONG_TYPE, format!("expected text, found {k}"))),
        }
    }

    pub fn list(&self, field: &str, ctx: &RowCtx) -> Result<&'a Vec<Value>, Reject> {
        match self.get(field) {
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

    pub fn tools(&self, ctx: &RowCtx) -> Result<Option<Value>, Reject> {
        match self.get("tools") {
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

/// Rows and contexts for the formats' unit tests.
#[cfg(test)]
pub mod testing {
    use crate::accounting::RowCtx;
    use serde_json::{Map, Value};

    pub const CTX: RowCtx<'static> = RowCtx { source: "t.jsonl", row: 3, line: Some(3) };

    pub fn row(v: Value) -> Map<String, Value> {
        v.as_object().expect("a JSON object").clone()
    }

    /// The text of each message as `role: content`.
    pub fn turns(c: &crate::record::Conversation) -> Vec<String> {
        c.messages.iter().map(|m| format!("{}: {}", m.role, m.content)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{row, CTX};
    use super::*;
    use serde_json::json;

    #[test]
    fn fields_read_through_renames_and_say_which_column_is_wrong() {
        let r = row(json!({"question": "Why?", "n": 42, "empty": " ", "list": "[1, 2]", "tools": [{"name": "f"}]}));
        let renames = HashMap::from([("prompt".to_string(), "question".to_string())]);
        let f = Fields { row: &r, renames: &renames, prompts: false };
        assert_eq!(f.text("prompt", &CTX).unwrap(), "Why?");
        assert_eq!(f.text("n", &CTX).unwrap(), "42", "numbers are stringified");
        let e = f.text("empty", &CTX).unwrap_err();
        assert_eq!((e.reason, e.field.as_deref(), e.row), (reason::EMPTY_FIELD, Some("empty"), 3));
        assert_eq!(f.text("completion", &CTX).unwrap_err().reason, reason::MISSING_FIELD);
        assert_eq!(f.opt_text("missing", &CTX).unwrap(), "");
        assert!(f.list("list", &CTX).unwrap_err().detail.contains("holds JSON text"));
        // Bare function definitions become OpenAI tools.
        assert_eq!(f.tools(&CTX).unwrap().unwrap(), json!([{"type": "function", "function": {"name": "f"}}]));
        // For prompts an answer may be absent.
        let p = Fields { row: &r, renames: &renames, prompts: true };
        assert_eq!(p.answer("completion", &CTX).unwrap(), "");
    }
}
