//! alpaca: `instruction`, `output`, optional `input`, `system` and `history` (LLaMA-Factory's
//! alpaca shape; also what `--method prompts` reads from `instruction` alone).

use super::fields::Fields;
use crate::accounting::{reason, Reject, RowCtx};
use crate::record::{Conversation, Message};
use serde_json::Value;

/// An alpaca row: `instruction` (+ `input` on its own line), the answer in `output`, an optional
/// `system` and `history` of [question, answer] pairs before it.
pub fn map(f: &Fields, ctx: &RowCtx) -> Result<Conversation, Reject> {
    let instruction = f.text("instruction", ctx)?;
    let input = f.opt_text("input", ctx)?;
    let output = f.answer("output", ctx)?;
    let mut msgs = Vec::with_capacity(4);
    let system = f.opt_text("system", ctx)?;
    if !system.trim().is_empty() {
        msgs.push(Message::new("system", system));
    }
    if let Some(Value::Array(hist)) = f.get("history") {
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
    Ok(Conversation::new(ctx.id(), super::with_answer(msgs, output)))
}

#[cfg(test)]
mod tests {
    use super::super::fields::testing::{row, turns, CTX};
    use super::*;
    use serde_json::json;
    use std::collections::HashMap;

    #[test]
    fn instruction_and_input_after_the_system_and_history() {
        let r = row(json!({"instruction": "Add", "input": "2+2", "output": "4", "system": "Be brief.",
                            "history": [["Hi", "Hello"]]}));
        let c = map(&Fields { row: &r, renames: &HashMap::new(), prompts: false }, &CTX).unwrap();
        assert_eq!(turns(&c), ["system: Be brief.", "user: Hi", "assistant: Hello", "user: Add\n2+2", "assistant: 4"]);
        assert_eq!(c.id, "t.jsonl:3");
        let bad = row(json!({"instruction": "Add", "output": "4", "history": ["Hi"]}));
        let e = map(&Fields { row: &bad, renames: &HashMap::new(), prompts: false }, &CTX).unwrap_err();
        assert_eq!((e.reason, e.field.as_deref()), (reason::WRONG_TYPE, Some("history")));
    }
}
