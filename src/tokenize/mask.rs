//! Rendering a conversation with its trained spans, and turning them into labels.
//!
//! The spans come from rendering prefixes, not from searching for marker strings: for the
//! assistant message `i`, `render(messages[..i], add_generation_prompt=true)` ends where the
//! answer starts, and `render(messages[..=i])` ends after its end-of-turn token. When a template
//! renders earlier turns differently from the last one (Qwen3 drops `<think>` from history), the
//! answer is found after the prompt prefix by its content and the end-of-turn text that follows it.
//! A token is trained when it starts inside a span.

use super::load::TokenizerInfo;
use crate::accounting::reason;
use crate::record::{Conversation, Message};
use crate::template::chat::ChatTemplate;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossMode {
    /// Every assistant message (content + end-of-turn), except those with weight 0.
    #[default]
    Assistant,
    /// Only the final assistant message.
    Last,
    /// Every token.
    All,
}

/// One tokenized conversation.
#[derive(Debug, Clone)]
pub struct Sample {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i32>,
}

impl Sample {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
    pub fn trained(&self) -> usize {
        self.labels.iter().filter(|&&l| l != -100).count()
    }
}

/// A failure for one conversation: a reject reason and a detail.
pub type SampleError = (&'static str, String);

pub struct Tokenizing<'a> {
    pub tok: &'a TokenizerInfo,
    pub template: &'a ChatTemplate,
    pub mode: LossMode,
}

/// Trained byte ranges of the rendered text.
pub type Spans = Vec<(usize, usize)>;

impl Tokenizing<'_> {
    fn render(&self, conv: &Conversation, msgs: &[Message], gen: bool) -> Result<String, SampleError> {
        self.template.render(msgs, conv.tools.as_ref(), gen).map_err(|e| {
            (
                reason::CHAT_TEMPLATE_ERROR,
                format!("chat template '{}' failed for {}: {e:#}", self.template.name, conv.id),
            )
        })
    }

    /// Renders the conversation and finds the trained spans.
    pub fn render_spans(&self, conv: &Conversation) -> Result<(String, Spans), SampleError> {
        if conv.is_text() {
            let mut text = String::new();
            if self.tok.add_bos_token {
                text.push_str(self.tok.special("bos_token").unwrap_or(""));
            }
            text.push_str(&conv.messages[0].content);
            text.push_str(self.tok.special("eos_token").unwrap_or(""));
            let n = text.len();
            return Ok((text, vec![(0, n)]));
        }
        let msgs = &conv.messages;
        let full = self.render(conv, msgs, false)?;
        if self.mode == LossMode::All {
            let n = full.len();
            return Ok((full, vec![(0, n)]));
        }
        let last_assistant = msgs.iter().rposition(|m| m.role == "assistant");
        let targets: Vec<usize> = match self.mode {
            LossMode::Assistant => (0..msgs.len()).filter(|&i| msgs[i].trainable()).collect(),
            LossMode::Last => last_assistant.filter(|&i| msgs[i].trainable()).into_iter().collect(),
            LossMode::All => unreachable!(),
        };
        let mut spans = Vec::with_capacity(targets.len());
        let mut cursor = 0usize;
        for i in targets {
            let pre = self.render(conv, &msgs[..i], true)?;
            let upto = if i + 1 == msgs.len() { full.clone() } else { self.render(conv, &msgs[..=i], false)? };
            let span = if full.starts_with(&upto)
                && upto.starts_with(&pre)
                && upto.len() > pre.len()
                && pre.len() >= cursor
            {
                (pre.len(), pre.len() + upto[pre.len()..].trim_end().len())
            } else {
                find_by_content(&full, &pre, &upto, &msgs[i].content, cursor).ok_or_else(|| {
                    (
                        reason::MASK_SPAN_NOT_FOUND,
                        format!("cannot locate assistant message {i} of {} in the rendered text (the template may rewrite it)", conv.id),
                    )
                })?
            };
            cursor = span.1;
            spans.push(span);
        }
        Ok((full, spans))
    }

    /// Tokenizes the conversation and masks everything outside the trained spans.
    pub fn sample(&self, conv: &Conversation) -> Result<Sample, SampleError> {
        let (text, spans) = self.render_spans(conv)?;
        let enc = self
            .tok
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| (reason::CHAT_TEMPLATE_ERROR, format!("tokenizer failed on {}: {e}", conv.id)))?;
        let ids = enc.get_ids().to_vec();
        let offsets = enc.get_offsets();
        let mut labels = vec![-100i32; ids.len()];
        let mut s = 0;
        for (j, (&id, &(start, _))) in ids.iter().zip(offsets).enumerate() {
            while s < spans.len() && start >= spans[s].1 {
                s += 1;
            }
            if s < spans.len() && start >= spans[s].0 {
                labels[j] = id as i32;
            }
        }
        let sample = Sample { input_ids: ids, labels };
        if sample.trained() == 0 {
            return Err((
                reason::EMPTY_LOSS_MASK,
                format!("{}: no token is trained (no trainable assistant message for this --loss mode)", conv.id),
            ));
        }
        Ok(sample)
    }
}

/// Fallback span: the answer starts where the generation prompt ends (when that is a prefix of the
/// full text) or at its content, and ends after the content plus the end-of-turn text that follows
/// it in `upto`.
fn find_by_content(full: &str, pre: &str, upto: &str, content: &str, cursor: usize) -> Option<(usize, usize)> {
    let needle = content.trim();
    let from = if full.starts_with(pre) && pre.len() >= cursor { pre.len() } else { cursor };
    let pos = if needle.is_empty() { from } else { from + full.get(from..)?.find(needle)? };
    let start = if full.starts_with(pre) && pre.len() >= cursor { pre.len() } else { pos };
    let mut end = pos + needle.len();
    // End-of-turn: what the template writes right after this content when it is the last turn.
    let eot = upto.rfind(needle).map(|p| upto[p + needle.len()..].trim()).unwrap_or("");
    if !eot.is_empty() {
        let rest = &full[end..];
        let ws = rest.len() - rest.trim_start().len();
        if rest.trim_start().starts_with(eot) {
            end += ws + eot.len();
        }
    }
    Some((start, end))
}
