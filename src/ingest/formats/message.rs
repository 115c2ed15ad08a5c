//! One message from the many ways datasets spell it: roles by their aliases (human, gpt, model,
//! observation...), content as text or a list of text parts, OpenAI messages (with weights and tool
//! calls) and ShareGPT turns (with function calls), and the check that no message is empty.

use crate::accounting::{reason, Reject, RowCtx};
use crate::ingest::rows::json_kind;
use crate::record::Message;
use serde_json::Value;

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

/// The canonical role of a speaker's name.
fn norm_role(r: &str) -> Option<&'static str> {
    Some(match r {
        "system" | "developer" => "system",
        "user" | "human" => "user",
        "assistant" | "gpt" | "model" | "chatgpt" | "bard" | "bing" | "bot" => "assistant",
        "tool" | "observation" | "function" | "ipython" => "tool",
        _ => return None,
    })
}

/// A ShareGPT turn `{from, value}` (or `{role, content}`); a `function_call` turn is a tool call.
pub fn sharegpt_turn(t: &Value, i: usize, field: &str, ctx: &RowCtx) -> Result<Message, Reject> {
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

/// An OpenAI message `{role, content, weight?, tool_calls?, ...}`.
pub fn openai_message(v: &Value, i: usize, field: &str, ctx: &RowCtx) -> Result<Message, Reject> {
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

/// Every message has content (or a tool call).
pub fn check_messages(msgs: &[Message], field: &str, ctx: &RowCtx) -> Result<(), Reject> {
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

#[cfg(test)]
mod tests {
    use super::super::fields::testing::CTX;
    use super::*;
    use serde_json::json;

    #[test]
    fn roles_by_alias_content_by_parts_and_tool_calls() {
        let parts = json!({"role": "developer", "content": [{"type": "text", "text": "a"}, "b"]});
        let m = openai_message(&parts, 0, "messages", &CTX).unwrap();
        assert_eq!((m.role.as_str(), m.content.as_str()), ("system", "ab"));
        let w =
            openai_message(&json!({"role": "assistant", "content": "x", "weight": 0}), 1, "messages", &CTX).unwrap();
        assert_eq!(w.weight, Some(0));
        let e = openai_message(&json!({"role": "narrator", "content": "x"}), 2, "messages", &CTX).unwrap_err();
        assert_eq!((e.reason, e.field.as_deref()), (reason::BAD_ROLE, Some("messages[2]")));
        let call = json!({"from": "function_call", "value": "{\"name\": \"f\", \"arguments\": {\"x\": 1}}"});
        let t = sharegpt_turn(&call, 1, "conversations", &CTX).unwrap();
        assert_eq!(t.extra["tool_calls"][0]["function"]["arguments"], "{\"x\":1}");
        let obs = sharegpt_turn(&json!({"from": "observation", "value": "2"}), 2, "conversations", &CTX).unwrap();
        assert_eq!((obs.role.as_str(), &obs.extra["tool_call_id"]), ("tool", &json!("call_1")));
        let empty = [Message::new("user", "q"), Message::new("assistant", " ")];
        assert_eq!(check_messages(&empty, "messages", &CTX).unwrap_err().field.as_deref(), Some("messages[1]"));
    }
}
