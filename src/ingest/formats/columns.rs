//! columns: any columns, through `--prompt` / `--completion` minijinja templates or a prompt
//! template file whose blocks render the system message, the prompt and the completion.

use crate::accounting::{Reject, RowCtx};
use crate::record::{Conversation, Message};
use crate::template::ColumnTemplates;
use serde_json::{Map, Value};

/// The row rendered through the templates: an optional system turn, the prompt, the completion.
pub fn map(t: &ColumnTemplates, row: &Map<String, Value>, ctx: &RowCtx) -> Result<Conversation, Reject> {
    let (system, prompt, completion) = t.render(row, ctx)?;
    let mut msgs = Vec::with_capacity(3);
    if !system.trim().is_empty() {
        msgs.push(Message::new("system", system));
    }
    msgs.push(Message::new("user", prompt));
    Ok(Conversation::new(ctx.id(), super::with_answer(msgs, completion)))
}

#[cfg(test)]
mod tests {
    use super::super::fields::testing::{row, turns, CTX};
    use super::*;
    use serde_json::json;

    #[test]
    fn templates_render_the_prompt_and_completion_from_the_columns() {
        let t = ColumnTemplates::new(Some("Capital of {{ country }}?"), Some("{{ capital }}"), None, false).unwrap();
        let c = map(&t, &row(json!({"country": "France", "capital": "Paris"})), &CTX).unwrap();
        assert_eq!(turns(&c), ["user: Capital of France?", "assistant: Paris"]);
        let e = map(&t, &row(json!({"country": "France", "capital": ""})), &CTX).unwrap_err();
        assert_eq!(e.row, 3);
    }
}
