//! One answer to a conversation (`tunekit generate`): render the chat template with its generation
//! prompt, complete it with the rollout engine, stop at end-of-turn or end-of-sequence tokens.

use super::{complete, SamplingParams};
use crate::record::Message;
use crate::template::chat::ChatTemplate;
use crate::tokenize::TokenizerInfo;
use crate::train::model::Model;
use anyhow::Result;

/// Token ids that end a turn: the eos token, and end-of-turn markers the vocabulary has.
pub fn stop_ids(tok: &TokenizerInfo) -> Vec<u32> {
    let mut names: Vec<String> = ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if let Some(e) = tok.special("eos_token") {
        names.push(e.to_string());
    }
    let mut ids: Vec<u32> = names.iter().filter_map(|n| tok.tokenizer.token_to_id(n)).collect();
    ids.sort();
    ids.dedup();
    ids
}

/// The model's answer to `messages`, sampled with `params` from `seed`.
pub fn generate(
    model: &Model,
    tok: &TokenizerInfo,
    tpl: &ChatTemplate,
    messages: &[Message],
    params: &SamplingParams,
    seed: u64,
) -> Result<String> {
    let prompt = tpl.render(messages, None, true).map_err(|e| anyhow::anyhow!("chat template: {e:#}"))?;
    let ids =
        tok.tokenizer.encode(prompt.as_str(), false).map_err(|e| anyhow::anyhow!("tokenize: {e}"))?.get_ids().to_vec();
    let stops = stop_ids(tok);
    let mut c = complete(model, &[&ids], &[0], &[seed], params, &stops)?.remove(0);
    if c.finished {
        c.tokens.pop();
    }
    tok.tokenizer.decode(&c.tokens, true).map_err(|e| anyhow::anyhow!("decode: {e}"))
}
