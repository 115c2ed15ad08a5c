//! A GGUF file's header (metadata and tensor index, no tensor data) and its metadata values as
//! the types the readers need, with errors that name the file and the missing key.

use anyhow::{Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

/// Metadata as candle reads it.
pub type Metadata = HashMap<String, Value>;

/// The file at `path`, open, with its header read (the file positioned for reading tensors).
pub fn open(path: &Path) -> Result<(File, Content)> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let content = Content::read(&mut file).with_context(|| format!("{}: not a GGUF file", path.display()))?;
    Ok((file, content))
}

/// A required unsigned integer.
pub fn usize_of(md: &Metadata, key: &str) -> Result<usize> {
    md.get(key)
        .with_context(|| format!("GGUF metadata has no '{key}'"))?
        .to_u32()
        .map(|v| v as usize)
        .map_err(Into::into)
}

/// An optional float.
pub fn f64_of(md: &Metadata, key: &str) -> Option<f64> {
    md.get(key).and_then(|v| v.to_f32().ok()).map(|v| v as f64)
}

/// An optional unsigned integer (a token id).
pub fn u32_of(md: &Metadata, key: &str) -> Option<u32> {
    md.get(key).and_then(|v| v.to_u32().ok())
}

/// An optional string.
pub fn string_of(md: &Metadata, key: &str) -> Option<String> {
    md.get(key).and_then(|v| v.to_string().ok()).cloned()
}

/// A required array of strings.
pub fn strings_of(md: &Metadata, key: &str) -> Result<Vec<String>> {
    md.get(key)
        .with_context(|| format!("GGUF metadata has no '{key}'"))?
        .to_vec()?
        .iter()
        .map(|v| v.to_string().cloned().map_err(anyhow::Error::from))
        .collect()
}
