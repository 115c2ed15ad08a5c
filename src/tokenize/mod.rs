//! Tokenization with loss masks: a conversation becomes `input_ids` and `labels` (token id where
//! the model learns, -100 elsewhere), rendered through the chat template exactly as transformers'
//! `apply_chat_template(..., tokenize=True)` does (render, then encode without adding special tokens).
//!
//! [`load`] reads tokenizer.json (optionally .gz) with its tokenizer_config.json, or rebuilds the
//! tokenizer of a GGUF file ([`gguf`]) or a SentencePiece model ([`sentencepiece_model`]); [`mask`] finds the
//! trained character spans by rendering conversation prefixes and maps them to tokens by offsets;
//! [`decode`] turns token ids back into text with the trained spans marked.

pub mod decode;
pub mod gguf;
pub mod load;
pub mod mask;
pub mod sentencepiece_model;

pub use load::TokenizerInfo;
pub use mask::{LossMode, Sample, Tokenizing};

use crate::template::chat::ChatTemplate;

/// The chat template to render with: `--template` (a built-in name or a .jinja file), else the
/// tokenizer's own.
pub fn chat_template(tok: &TokenizerInfo, template: Option<&str>) -> anyhow::Result<ChatTemplate> {
    match template {
        Some(t) => ChatTemplate::builtin_or_file(t, tok.specials.clone()),
        None => match &tok.chat_template {
            Some(src) => ChatTemplate::new("tokenizer", src, tok.specials.clone()),
            None => anyhow::bail!(
                "{} has no chat_template; pass --template with a built-in (chatml, llama3, mistral, gemma, phi3, zephyr, alpaca) or a .jinja file",
                tok.path.display()
            ),
        },
    }
}
