//! GGUF, llama.cpp's file format, and the conventions llama.cpp keeps in it: one room that knows
//! the file and nothing of training. [`metadata`] reads a file's header and typed metadata values;
//! [`writer`] writes a GGUF file tensor by tensor; [`names`] holds llama.cpp's architecture names and
//! its tensor names against Hugging Face's (the table a new model family adds its rows to);
//! [`rotary`] converts q/k rows between Hugging Face's layout and llama.cpp's rotary order.
//!
//! Its users: `train::io::gguf` loads GGUF bases through it, `export::gguf` writes adapters and
//! merged models through it, `tokenize::gguf` reads vocabularies through it.

pub mod metadata;
pub mod names;
pub mod rotary;
pub mod writer;
