//! One answer to a conversation (`tunekit generate`): render the chat template with its generation
//! prompt, complete it with the rollout engine, stop at end-of-turn or end-of-sequence tokens.

use super::{complete, SamplingParams};
use crate::record::Message;
use crate::template::chat::ChatTemplate;
use crate::tokenize::TokenizerInfo;
use crate::train::model::Model;
use anyhow::Result;

/// The model's answer to `messages`, sampled with `params` from `seed`: its text and token ids
/// (without the end-of-turn token).
pub fn generate(
    model: &Model,
    tok: &TokenizerInfo,
    tpl: &ChatTemplate,
    messages: &[Message],
    params: &SamplingParams,
    seed: u64,
) -> Result<(String, Vec<u32>)> {
    let prompt = tpl.render(messages, None, true).map_err(|e| anyhow::anyhow!("chat template: {e:#}"))?;
    let ids =
        tok.tokenizer.encode(prompt.as_str(), false).map_err(|e| anyhow::anyhow!("tokenize: {e}"))?.get_ids().to_vec();
    let stops = tok.stop_ids();
    let mut c = complete(model, &[&ids], &[0], &[seed], params, &stops)?.remove(0);
    if c.finished {
        c.tokens.pop();
    }
    let text = tok.tokenizer.decode(&c.tokens, true).map_err(|e| anyhow::anyhow!("decode: {e}"))?;
    Ok((text, c.tokens))
}
