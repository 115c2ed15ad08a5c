//! prompt-completion: `prompt` and `completion` (TRL's standard prompt-completion shape); also what
//! `--format auto` reads question/answer, query/response and input/output columns as.

use super::fields::Fields;
use crate::accounting::{Reject, RowCtx};
use crate::record::{Conversation, Message};

/// The prompt as the user's turn, the completion as the answer.
pub fn map(f: &Fields, ctx: &RowCtx) -> Result<Conversation, Reject> {
    let p = f.text("prompt", ctx)?;
    let c = f.answer("completion", ctx)?;
    Ok(Conversation::new(ctx.id(), super::with_answer(vec![Message::new("user", p)], c)))
}

#[cfg(test)]
mod tests {
    use super::super::fields::testing::{row, turns, CTX};
    use super::*;
    use serde_json::json;
    use std::collections::HashMap;

    #[test]
    fn the_prompt_is_the_user_and_the_completion_the_answer() {
        let r = row(json!({"prompt": "2+2?", "completion": "4"}));
        let c = map(&Fields { row: &r, renames: &HashMap::new(), prompts: false }, &CTX).unwrap();
        assert_eq!(turns(&c), ["user: 2+2?", "assistant: 4"]);
        // A prompt for online RL needs no answer.
        let r = row(json!({"prompt": "2+2?"}));
        let c = map(&Fields { row: &r, renames: &HashMap::new(), prompts: true }, &CTX).unwrap();
        assert_eq!(turns(&c), ["user: 2+2?"]);
    }
}
