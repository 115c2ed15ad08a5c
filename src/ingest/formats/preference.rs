//! preference: `chosen` + `rejected` answers with their prompt — as text, single messages, whole
//! transcripts (TRL conversational) or Anthropic HH-RLHF `\n\nHuman: ... \n\nAssistant:` text, whose
//! shared prefix becomes the prompt.

use super::fields::Fields;
use super::message::{openai_message, sharegpt_turn};
use crate::accounting::{reason, Reject, RowCtx};
use crate::ingest::rows::json_kind;
use crate::record::{Conversation, Message};
use serde_json::Value;

/// A preference row: `chosen` and `rejected` (or `*_messages`) after a prompt from `conversations`,
/// `messages`, `prompt`/`question`/`instruction`, or their shared transcript prefix.
pub fn map(f: &Fields, ctx: &RowCtx) -> Result<Conversation, Reject> {
    // Prompt: messages / conversations / prompt (string or messages); HH transcripts have none.
    let mut prompt: Vec<Message> = Vec::new();
    let system = f.opt_text("system", ctx)?;
    if !system.trim().is_empty() {
        prompt.push(Message::new("system", system));
    }
    let chosen_v = f.get("chosen").or_else(|| f.get("chosen_messages"));
    let rejected_v = f.get("rejected").or_else(|| f.get("rejected_messages"));
    let (Some(chosen_v), Some(rejected_v)) = (chosen_v, rejected_v) else {
        return Err(ctx.reject(
            Some("chosen"),
            reason::NOT_PREFERENCE,
            "a preference row needs both 'chosen' and 'rejected'",
        ));
    };
    if let Some(Value::Array(turns)) = f.get("conversations") {
        for (i, t) in turns.iter().enumerate() {
            prompt.push(sharegpt_turn(t, i, "conversations", ctx)?);
        }
    } else if let Some(Value::Array(list)) = f.get("messages") {
        for (i, m) in list.iter().enumerate() {
            prompt.push(openai_message(m, i, "messages", ctx)?);
        }
    } else if let Some(p) = f.get("prompt").or_else(|| f.get("question")).or_else(|| f.get("instruction")) {
        match p {
            Value::Array(list) => {
                for (i, m) in list.iter().enumerate() {
                    prompt.push(openai_message(m, i, "prompt", ctx)?);
                }
            }
            v => {
                let s = super::fields::scalar_text(v)
                    .map_err(|k| ctx.reject(Some("prompt"), reason::WRONG_TYPE, format!("expected text, found {k}")))?;
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

/// Where the next HH turn marker starts.
fn next_marker(s: &str) -> Option<usize> {
    match (s.find("\n\nHuman:"), s.find("\n\nAssistant:")) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::super::fields::testing::{row, turns, CTX};
    use super::*;
    use serde_json::json;
    use std::collections::HashMap;

    fn pair(v: serde_json::Value) -> Result<Conversation, Reject> {
        let r = row(v);
        map(&Fields { row: &r, renames: &HashMap::new(), prompts: false }, &CTX)
    }

    #[test]
    fn a_prompt_and_two_answers_in_each_shape() {
        let c = pair(json!({"prompt": "Q", "chosen": "good", "rejected": "bad"})).unwrap();
        assert_eq!(turns(&c), ["user: Q"]);
        assert_eq!((c.chosen.unwrap().content, c.rejected.unwrap().content), ("good".into(), "bad".into()));
        // HH-RLHF transcripts: the shared prefix is the prompt.
        let c = pair(
            json!({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}),
        )
        .unwrap();
        assert_eq!(turns(&c), ["user: Hi"]);
        assert_eq!(c.chosen.unwrap().content, "Hello!");
        // Answers that differ in more than the last turn are not a pair.
        let e = pair(
            json!({"prompt": "Q", "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
                            "rejected": [{"role": "assistant", "content": "c"}]}),
        )
        .unwrap_err();
        assert_eq!(e.reason, reason::NOT_PREFERENCE);
        assert_eq!(pair(json!({"prompt": "Q", "chosen": "good"})).unwrap_err().reason, reason::NOT_PREFERENCE);
    }
}
