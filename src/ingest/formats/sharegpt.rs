//! sharegpt: `conversations: [{from: human/gpt/system/function_call/observation, value}]`,
//! optional `system` and `tools`.

use super::fields::Fields;
use super::message::{check_messages, sharegpt_turn};
use crate::accounting::{Reject, RowCtx};
use crate::record::{Conversation, Message};

/// A ShareGPT row: `conversations` (or `conversation`) turns, optional `system` and `tools`.
pub fn map(f: &Fields, ctx: &RowCtx) -> Result<Conversation, Reject> {
    let field = if f.get("conversations").is_some() { "conversations" } else { "conversation" };
    let turns = f.list(field, ctx)?;
    let mut msgs = Vec::with_capacity(turns.len() + 1);
    let system = f.opt_text("system", ctx)?;
    if !system.trim().is_empty() {
        msgs.push(Message::new("system", system));
    }
    for (i, t) in turns.iter().enumerate() {
        msgs.push(sharegpt_turn(t, i, field, ctx)?);
    }
    let mut conv = Conversation::new(ctx.id(), msgs);
    conv.tools = f.tools(ctx)?;
    check_messages(&conv.messages, field, ctx)?;
    Ok(conv)
}

#[cfg(test)]
mod tests {
    use super::super::fields::testing::{row, turns, CTX};
    use super::*;
    use crate::accounting::reason;
    use serde_json::json;
    use std::collections::HashMap;

    #[test]
    fn turns_by_speaker_with_the_system_first() {
        let r = row(json!({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
                            "system": "Be kind."}));
        let c = map(&Fields { row: &r, renames: &HashMap::new(), prompts: false }, &CTX).unwrap();
        assert_eq!(turns(&c), ["system: Be kind.", "user: Hi", "assistant: Hello"]);
        let r = row(json!({"conversations": [{"from": "narrator", "value": "Once"}]}));
        let e = map(&Fields { row: &r, renames: &HashMap::new(), prompts: false }, &CTX).unwrap_err();
        assert_eq!((e.reason, e.field.as_deref()), (reason::BAD_ROLE, Some("conversations[0]")));
    }
}
