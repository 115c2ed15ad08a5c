//! messages: OpenAI chat messages `[{role, content, weight?, tool_calls?}]` — the canonical record
//! itself, so a record written by tunekit reads back with its id and meta.

use super::fields::Fields;
use super::message::{check_messages, openai_message};
use crate::accounting::{Reject, RowCtx};
use crate::record::Conversation;
use serde_json::{Map, Value};
use std::collections::HashMap;

/// A messages row: `messages`, and when it is a canonical record its `id`, `meta`, `tools` and
/// `chosen`/`rejected` answers.
pub fn map(
    mut row: Map<String, Value>,
    renames: &HashMap<String, String>,
    ctx: &RowCtx,
) -> Result<Conversation, Reject> {
    let f = Fields { row: &row, renames, prompts: false };
    let list = f.list("messages", ctx)?;
    let mut msgs = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        msgs.push(openai_message(m, i, "messages", ctx)?);
    }
    check_messages(&msgs, "messages", ctx)?;
    let tools = f.tools(ctx)?;
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
    conv.tools = tools;
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

#[cfg(test)]
mod tests {
    use super::super::fields::testing::{row, turns, CTX};
    use super::*;
    use serde_json::json;

    #[test]
    fn a_canonical_record_keeps_its_id_meta_and_answers() {
        let r = row(json!({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
                            "id": "x:1", "meta": "{\"source\": \"s\"}",
                            "chosen": {"role": "assistant", "content": "good"}, "rejected": null}));
        let c = map(r, &HashMap::new(), &CTX).unwrap();
        assert_eq!((c.id.as_str(), &c.meta["source"]), ("x:1", &json!("s")));
        assert_eq!(turns(&c), ["user: Q", "assistant: A"]);
        assert_eq!(c.chosen.unwrap().content, "good");
        assert!(c.rejected.is_none());
        // Without an id the row's own.
        let c = map(row(json!({"messages": [{"role": "user", "content": "Q"}]})), &HashMap::new(), &CTX).unwrap();
        assert_eq!(c.id, "t.jsonl:3");
    }
}
