//! A full fine-tune's output: the run directory as a Hugging Face model directory, which
//! transformers loads and `tunekit eval/generate/export --model` take as a base. The weights and
//! config.json as [`super::merge`] writes them (sharded above 5 GB), the tokenizer the data was
//! prepared with (a directory's files copied; a GGUF's vocabulary written as tokenizer.json with its
//! tokenizer_config.json), and generation_config.json (the base's, or its special token ids).

use crate::tokenize::load::TokenizerInfo;
use crate::train::model::Model;
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::path::Path;

/// The tokenizer and generation files a Hugging Face directory carries beside its weights.
const TOKENIZER_FILES: [&str; 9] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
];

/// Writes `model` (every weight as trained) to `out` as a Hugging Face model directory, with the
/// tokenizer of `tokenizer` (a directory, a tokenizer.json or a GGUF file) and `base`'s generation
/// config.
pub fn write(model: &Model, base: &Path, tokenizer: &Path, out: &Path) -> Result<()> {
    super::merge::write_hf(model, out)?;
    write_tokenizer(tokenizer, out)?;
    let generation = base.join("generation_config.json");
    if base.is_dir() && generation.exists() {
        std::fs::copy(&generation, out.join("generation_config.json"))?;
    } else if !out.join("generation_config.json").exists() {
        let c = &model.config;
        let mut g = json!({"_from_model_config": true});
        for (k, v) in [("bos_token_id", &c.bos_token_id), ("eos_token_id", &c.eos_token_id)] {
            if let Some(v) = v {
                g[k] = v.clone();
            }
        }
        std::fs::write(out.join("generation_config.json"), serde_json::to_string_pretty(&g)?)?;
    }
    Ok(())
}

/// The tokenizer files into `out`: copied from a Hugging Face directory (or from beside a
/// tokenizer.json), or built from a GGUF file's vocabulary and metadata.
fn write_tokenizer(tokenizer: &Path, out: &Path) -> Result<()> {
    if tokenizer.extension().is_some_and(|e| e == "gguf") {
        let g = crate::tokenize::gguf::read(tokenizer)?;
        std::fs::write(out.join("tokenizer.json"), &g.json)?;
        let mut cfg = json!({"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": g.add_bos});
        for (k, v) in &g.specials {
            cfg[k] = v.clone();
        }
        if let Some(t) = &g.chat_template {
            cfg["chat_template"] = Value::String(t.clone());
        }
        std::fs::write(out.join("tokenizer_config.json"), serde_json::to_string_pretty(&cfg)?)?;
        return Ok(());
    }
    let dir = match tokenizer.is_dir() {
        true => tokenizer,
        false => tokenizer.parent().context("a tokenizer file has a directory")?,
    };
    for name in TOKENIZER_FILES {
        let from = dir.join(name);
        if from.exists() && std::fs::canonicalize(&from)? != std::fs::canonicalize(out)?.join(name) {
            std::fs::copy(&from, out.join(name)).with_context(|| format!("cannot copy {}", from.display()))?;
        }
    }
    if !tokenizer.is_dir() && tokenizer.file_name().is_some_and(|n| n != "tokenizer.json") {
        // A gzipped tokenizer.json or a SentencePiece model: written as the tokenizer it loads as.
        let info = TokenizerInfo::load(tokenizer)?;
        info.tokenizer.save(out.join("tokenizer.json"), false).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(())
}
