//! GGUF out, for llama.cpp, Ollama and LM Studio: [`writer`] writes a GGUF file tensor by tensor;
//! [`adapter`] turns a PEFT LoRA adapter into llama.cpp's LoRA adapter format.

pub mod adapter;
pub mod writer;
