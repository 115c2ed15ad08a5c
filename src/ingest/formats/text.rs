//! text: one `text` column, kept whole as an assistant turn (continued pre-training on raw text);
//! marked `meta.format = text` so tokenizing trains on all of it without a chat template.

use super::fields::Fields;
use crate::accounting::{Reject, RowCtx};
use crate::record::{Conversation, Message};
use serde_json::Value;

/// The text as the conversation's one turn.
pub fn map(f: &Fields, ctx: &RowCtx) -> Result<Conversation, Reject> {
    let t = f.text("text", ctx)?;
    let mut c = Conversation::new(ctx.id(), vec![Message::new("assistant", t)]);
    c.meta.insert("format".into(), Value::from("text"));
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::super::fields::testing::{row, turns, CTX};
    use super::*;
    use serde_json::json;
    use std::collections::HashMap;

    #[test]
    fn text_is_one_turn_marked_as_text() {
        let r = row(json!({"text": "Once upon a time."}));
        let c = map(&Fields { row: &r, renames: &HashMap::new(), prompts: false }, &CTX).unwrap();
        assert_eq!(turns(&c), ["assistant: Once upon a time."]);
        assert_eq!(c.meta["format"], "text");
    }
}
