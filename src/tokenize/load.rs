//! Loading a tokenizer: `tokenizer.json` (or `.json.gz`), or a directory holding it and
//! `tokenizer_config.json` (special tokens, `chat_template`).

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::io::Read;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

pub struct TokenizerInfo {
    pub tokenizer: Tokenizer,
    pub path: PathBuf,
    /// sha256 of tokenizer.json (uncompressed bytes).
    pub sha256: String,
    /// bos_token, eos_token, unk_token, pad_token, ... as strings (transformers' special_tokens_map).
    pub specials: Map<String, Value>,
    pub chat_template: Option<String>,
    pub add_bos_token: bool,
    pub vocab_size: usize,
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .with_context(|| format!("{}: broken gzip data", path.display()))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// A special token entry: a string or an AddedToken object `{"content": ...}`.
fn token_str(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl TokenizerInfo {
    pub fn load(path: &Path) -> Result<TokenizerInfo> {
        let (json_path, config_path) = if path.is_dir() {
            let j = ["tokenizer.json", "tokenizer.json.gz"].iter().map(|n| path.join(n)).find(|p| p.exists());
            let Some(j) = j else {
                bail!("{}: no tokenizer.json in this directory; pass a tokenizer.json file or a Hugging Face model directory", path.display());
            };
            (j, Some(path.join("tokenizer_config.json")))
        } else if path.exists() {
            if path.extension().is_some_and(|e| e == "gguf") {
                return Self::from_gguf(path);
            }
            (path.to_path_buf(), path.parent().map(|d| d.join("tokenizer_config.json")))
        } else {
            bail!("tokenizer {} does not exist", path.display());
        };
        let bytes = read_maybe_gz(&json_path)?;
        let tokenizer = Tokenizer::from_bytes(&bytes).map_err(|e| {
            anyhow::anyhow!(
                "{}: not a Hugging Face tokenizer.json ({e}); pass the tokenizer.json that ships with the model",
                json_path.display()
            )
        })?;
        let sha256 = crate::digest::sha256(&bytes);
        let mut specials = Map::new();
        let mut chat_template = None;
        let mut add_bos_token = false;
        if let Some(cp) = config_path.filter(|p| p.exists()) {
            let cfg: Value = serde_json::from_slice(&std::fs::read(&cp)?)
                .with_context(|| format!("{}: invalid JSON", cp.display()))?;
            for k in ["bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"] {
                if let Some(s) = cfg.get(k).and_then(token_str) {
                    specials.insert(k.to_string(), Value::String(s));
                }
            }
            if let Some(Value::Array(extra)) = cfg.get("additional_special_tokens") {
                let list: Vec<Value> = extra.iter().filter_map(token_str).map(Value::String).collect();
                specials.insert("additional_special_tokens".into(), Value::Array(list));
            }
            chat_template = match cfg.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .or(list.first())
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                _ => None,
            };
            add_bos_token = cfg.get("add_bos_token").and_then(Value::as_bool).unwrap_or(false);
        }
        // A separate chat_template.jinja (newer transformers) wins if present.
        if let Some(dir) = json_path.parent() {
            let jinja = dir.join("chat_template.jinja");
            if jinja.exists() {
                chat_template = Some(std::fs::read_to_string(&jinja)?);
            }
        }
        let vocab_size = tokenizer.get_vocab_size(true);
        Ok(TokenizerInfo {
            tokenizer,
            path: path.to_path_buf(),
            sha256,
            specials,
            chat_template,
            add_bos_token,
            vocab_size,
        })
    }

    fn from_gguf(path: &Path) -> Result<TokenizerInfo> {
        let g = super::gguf::read(path)?;
        let tokenizer = Tokenizer::from_bytes(g.json.as_bytes()).map_err(|e| {
            anyhow::anyhow!("{}: cannot build a tokenizer from the GGUF vocabulary: {e}", path.display())
        })?;
        let sha256 = crate::digest::sha256(g.json.as_bytes());
        let vocab_size = tokenizer.get_vocab_size(true);
        Ok(TokenizerInfo {
            tokenizer,
            path: path.to_path_buf(),
            sha256,
            specials: g.specials,
            chat_template: g.chat_template,
            add_bos_token: false,
            vocab_size,
        })
    }

    /// Token ids that end a turn: the eos token, and the end-of-turn markers the vocabulary has.
    pub fn stop_ids(&self) -> Vec<u32> {
        let markers = ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>"];
        let mut ids: Vec<u32> = markers
            .into_iter()
            .chain(self.special("eos_token"))
            .filter_map(|n| self.tokenizer.token_to_id(n))
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    pub fn special(&self, name: &str) -> Option<&str> {
        self.specials.get(name).and_then(Value::as_str)
    }
}
