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
/// tokenizer's own. Without either, the error names the built-ins whose markers the vocabulary has.
pub fn chat_template(tok: &TokenizerInfo, template: Option<&str>) -> anyhow::Result<ChatTemplate> {
    match template {
        Some(t) => ChatTemplate::builtin_or_file(t, tok.specials.clone()),
        None => match &tok.chat_template {
            Some(src) => ChatTemplate::new("tokenizer", src, tok.specials.clone()),
            None => {
                let fits = fitting_templates(tok);
                let hint = match fits.as_slice() {
                    [] => String::new(),
                    f => format!(" (its vocabulary has the markers of {}: try --template {})", f.join(", "), f[0]),
                };
                anyhow::bail!(
                    "{} has no chat_template{hint}; pass --template with a built-in (chatml, llama3, mistral, gemma, phi3, zephyr, alpaca, harmony) or a .jinja file",
                    tok.path.display()
                )
            }
        },
    }
}

/// The built-in chat templates whose turn markers are tokens of the vocabulary.
pub fn fitting_templates(tok: &TokenizerInfo) -> Vec<&'static str> {
    let has = |t: &str| tok.tokenizer.token_to_id(t).is_some();
    let mut fits = vec![];
    for (name, markers) in [
        ("gemma", &["<start_of_turn>", "<end_of_turn>"][..]),
        ("chatml", &["<|im_start|>", "<|im_end|>"]),
        ("llama3", &["<|start_header_id|>", "<|eot_id|>"]),
        ("phi3", &["<|user|>", "<|end|>"]),
        ("zephyr", &["<|user|>", "</s>"]),
        ("mistral", &["[INST]", "[/INST]"]),
        ("harmony", &["<|start|>", "<|channel|>", "<|message|>"]),
    ] {
        if markers.iter().all(|m| has(m)) {
            fits.push(name);
        }
    }
    fits
}
