//! `tunekit export TARGET`: [`openai`] fine-tuning JSONL from conversations; [`gguf`] a trained
//! adapter as llama.cpp's LoRA GGUF.

pub mod gguf;
pub mod openai;
