//! Tokenization with loss masks: a conversation becomes `input_ids` and `labels` (token id where
//! the model learns, -100 elsewhere), rendered through the chat template exactly as transformers'
//! `apply_chat_template(..., tokenize=True)` does (render, then encode without adding special tokens).
//!
//! [`load`] reads tokenizer.json (optionally .gz) with its tokenizer_config.json; [`mask`] finds the
//! trained character spans by rendering conversation prefixes and maps them to tokens by offsets.

pub mod gguf;
pub mod load;
pub mod mask;

pub use load::TokenizerInfo;
pub use mask::{LossMode, Sample, Tokenizing};
