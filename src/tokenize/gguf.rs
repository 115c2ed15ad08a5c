//! A Hugging Face tokenizer rebuilt from GGUF metadata (`tokenizer.ggml.*`): byte-level BPE
//! ("gpt2" models: vocabulary, merges, control tokens as added special tokens, digits split one by
//! one as SmolLM/StarCoder do), plus the special tokens and `tokenizer.chat_template`.

use crate::gguf::metadata::{open, string_of, strings_of, u32_of};
use anyhow::{bail, Result};
use serde_json::{json, Map, Value as J};
use std::path::Path;

pub struct GgufTokenizer {
    /// tokenizer.json text.
    pub json: String,
    pub specials: Map<String, J>,
    pub chat_template: Option<String>,
}

pub fn read(path: &Path) -> Result<GgufTokenizer> {
    let (_, content) = open(path)?;
    let md = &content.metadata;
    let model = string_of(md, "tokenizer.ggml.model").unwrap_or_default();
    if model != "gpt2" {
        bail!("{}: GGUF tokenizer model '{model}' is not supported (byte-level BPE 'gpt2' is); pass the model's tokenizer.json", path.display());
    }
    let tokens = strings_of(md, "tokenizer.ggml.tokens")?;
    let merges = strings_of(md, "tokenizer.ggml.merges")?;
    let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
        Some(v) => v.to_vec()?.iter().map(|t| t.to_i32().unwrap_or(1)).collect(),
        None => vec![1; tokens.len()],
    };
    let vocab: Map<String, J> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), J::from(i))).collect();
    // Control (3) and user-defined (4) tokens are matched whole, before BPE.
    let added: Vec<J> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
        .map(|(i, t)| json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": types[i] == 3}))
        .collect();
    let tok = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges}
    });
    let mut specials = Map::new();
    for (key, name) in [("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"), ("padding", "pad_token")]
    {
        if let Some(id) = u32_of(md, &format!("tokenizer.ggml.{key}_token_id")) {
            if let Some(t) = tokens.get(id as usize) {
                specials.insert(name.to_string(), J::from(t.clone()));
            }
        }
    }
    let chat_template = string_of(md, "tokenizer.chat_template");
    Ok(GgufTokenizer { json: tok.to_string(), specials, chat_template })
}
