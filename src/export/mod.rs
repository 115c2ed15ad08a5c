//! OpenAI fine-tuning JSONL: [`openai`] writes it from any input (SFT or DPO), [`validate`] checks a
//! file the way the platform's data-preparation recipe does, [`tokens`] counts tokens with the
//! model's tiktoken encoding; [`gguf`] writes adapters and merged models for llama.cpp; [`ollama`]
//! writes the Modelfile that runs them as they were trained.

pub mod gguf;
pub mod ollama;
pub mod openai;
pub mod tokens;
pub mod validate;
