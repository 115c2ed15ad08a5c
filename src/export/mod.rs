//! OpenAI fine-tuning JSONL: [`openai`] writes it from any input (SFT or DPO), [`validate`] checks a
//! file the way the platform's data-preparation recipe does, [`tokens`] counts tokens with the
//! model's tiktoken encoding; [`gguf`] writes adapters for llama.cpp.

pub mod gguf;
pub mod openai;
pub mod tokens;
pub mod validate;
