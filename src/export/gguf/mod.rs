//! GGUF out, for llama.cpp, Ollama and LM Studio, written through [`crate::gguf`]: [`adapter`]
//! turns a PEFT LoRA adapter into llama.cpp's LoRA adapter format; [`merged`] writes a GGUF or
//! Hugging Face base ([`hf_base`]) with the adapter folded in, in f32, f16, bf16, q8_0 or
//! llama.cpp's q4_k_m mix.

pub mod adapter;
pub mod hf_base;
pub mod merged;
