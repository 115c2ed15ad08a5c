//! Token counts for OpenAI models (tiktoken-rs: o200k_base, cl100k_base) and the per-example
//! limits of fine-tunable models. Counting follows OpenAI's recipe: 3 tokens per message, the
//! encoded values, 1 more for a `name`, and 3 to prime the reply.

use anyhow::{bail, Result};
use serde_json::Value;
use std::sync::OnceLock;
use tiktoken_rs::CoreBPE;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Encoding {
    #[serde(rename = "o200k_base")]
    O200k,
    #[serde(rename = "cl100k_base")]
    Cl100k,
}

/// A fine-tunable model: its encoding and the most tokens one training example may have.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelSpec {
    pub model: String,
    pub encoding: Encoding,
    pub max_tokens_per_example: usize,
}

/// Known fine-tunable chat models (per-example training context from OpenAI's fine-tuning guide).
const MODELS: &[(&str, Encoding, usize)] = &[
    ("gpt-4.1-2025-04-14", Encoding::O200k, 65_536),
    ("gpt-4.1-mini-2025-04-14", Encoding::O200k, 65_536),
    ("gpt-4.1-nano-2025-04-14", Encoding::O200k, 65_536),
    ("gpt-4o-2024-08-06", Encoding::O200k, 65_536),
    ("gpt-4o-mini-2024-07-18", Encoding::O200k, 65_536),
    ("gpt-3.5-turbo-0125", Encoding::Cl100k, 16_385),
    ("gpt-3.5-turbo-1106", Encoding::Cl100k, 16_385),
    ("gpt-3.5-turbo-0613", Encoding::Cl100k, 4_096),
];

pub const DEFAULT_MODEL: &str = "gpt-4o-mini-2024-07-18";

pub fn model_spec(model: &str) -> Result<ModelSpec> {
    // Aliases without a date resolve to the newest snapshot of that family.
    let found = MODELS
        .iter()
        .find(|(m, _, _)| *m == model)
        .or_else(|| MODELS.iter().find(|(m, _, _)| m.starts_with(&format!("{model}-"))));
    match found {
        Some((m, e, l)) => Ok(ModelSpec { model: m.to_string(), encoding: *e, max_tokens_per_example: *l }),
        None => bail!(
            "unknown model '{model}'; fine-tunable models: {}",
            MODELS.iter().map(|(m, _, _)| *m).collect::<Vec<_>>().join(", ")
        ),
    }
}

pub fn bpe(enc: Encoding) -> &'static CoreBPE {
    static O200K: OnceLock<CoreBPE> = OnceLock::new();
    static CL100K: OnceLock<CoreBPE> = OnceLock::new();
    match enc {
        Encoding::O200k => O200K.get_or_init(|| tiktoken_rs::o200k_base().expect("o200k_base is compiled in")),
        Encoding::Cl100k => CL100K.get_or_init(|| tiktoken_rs::cl100k_base().expect("cl100k_base is compiled in")),
    }
}

pub fn count(enc: Encoding, text: &str) -> usize {
    bpe(enc).encode_ordinary(text).len()
}

/// Tokens of a messages list as OpenAI's recipe counts them, and the assistant tokens alone.
pub fn count_messages(enc: Encoding, messages: &[Value]) -> (usize, usize) {
    let mut total = 3;
    let mut assistant = 0;
    for m in messages {
        total += 3;
        let Some(o) = m.as_object() else { continue };
        for (k, v) in o {
            let n = match v {
                Value::String(s) => count(enc, s),
                Value::Null | Value::Number(_) | Value::Bool(_) => 0,
                other => count(enc, &other.to_string()),
            };
            total += n;
            if k == "name" {
                total += 1;
            }
        }
        if o.get("role").and_then(Value::as_str) == Some("assistant") {
            assistant += o.get("content").and_then(Value::as_str).map(|s| count(enc, s)).unwrap_or(0);
        }
    }
    (total, assistant)
}
