//! dolly: `instruction`, `response`, optional `context` (databricks-dolly-15k).

use super::fields::Fields;
use crate::accounting::{Reject, RowCtx};
use crate::record::{Conversation, Message};

/// A dolly row: `instruction` (+ `context` after a blank line) and its `response`.
pub fn map(f: &Fields, ctx: &RowCtx) -> Result<Conversation, Reject> {
    let instruction = f.text("instruction", ctx)?;
    let context = f.opt_text("context", ctx)?;
    let response = f.answer("response", ctx)?;
    let user = if context.trim().is_empty() { instruction } else { format!("{instruction}\n\n{context}") };
    Ok(Conversation::new(ctx.id(), super::with_answer(vec![Message::new("user", user)], response)))
}

#[cfg(test)]
mod tests {
    use super::super::fields::testing::{row, turns, CTX};
    use super::*;
    use crate::accounting::reason;
    use serde_json::json;
    use std::collections::HashMap;

    #[test]
    fn context_follows_the_instruction_after_a_blank_line() {
        let r = row(json!({"instruction": "Summarise", "context": "Long text.", "response": "Short."}));
        let c = map(&Fields { row: &r, renames: &HashMap::new(), prompts: false }, &CTX).unwrap();
        assert_eq!(turns(&c), ["user: Summarise\n\nLong text.", "assistant: Short."]);
        let r = row(json!({"instruction": "Summarise"}));
        let e = map(&Fields { row: &r, renames: &HashMap::new(), prompts: false }, &CTX).unwrap_err();
        assert_eq!(e.reason, reason::MISSING_FIELD);
    }
}
