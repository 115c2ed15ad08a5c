//! `tunekit export TARGET`: [`openai`] fine-tuning JSONL from conversations; [`gguf`] a trained
//! adapter as llama.cpp's LoRA GGUF (or merged into its base); [`ollama`] that and a Modelfile.

pub mod gguf;
pub mod ollama;
pub mod openai;
