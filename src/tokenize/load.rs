//! Loading a tokenizer: `tokenizer.json` (or `.json.gz`), or a directory holding it and
//! `tokenizer_config.json` (special tokens, `chat_template`); a GGUF file's vocabulary; a
//! SentencePiece `tokenizer.model` (a directory without tokenizer.json, or the file itself).

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

/// What tokenizer_config.json (and a chat_template.jinja beside it) says: the special tokens by
/// name, the chat template, whether a BOS is added.
#[derive(Default)]
struct Config {
    specials: Map<String, Value>,
    chat_template: Option<String>,
    add_bos_token: bool,
}

impl Config {
    fn read(config_path: Option<PathBuf>, dir: Option<&Path>) -> Result<Config> {
        let mut c = Config::default();
        if let Some(cp) = config_path.filter(|p| p.exists()) {
            let cfg: Value = serde_json::from_slice(&std::fs::read(&cp)?)
                .with_context(|| format!("{}: invalid JSON", cp.display()))?;
            for k in ["bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"] {
                if let Some(s) = cfg.get(k).and_then(token_str) {
                    c.specials.insert(k.to_string(), Value::String(s));
                }
            }
            if let Some(Value::Array(extra)) = cfg.get("additional_special_tokens") {
                let list: Vec<Value> = extra.iter().filter_map(token_str).map(Value::String).collect();
                c.specials.insert("additional_special_tokens".into(), Value::Array(list));
            }
            c.chat_template = match cfg.get("chat_template") {
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
            c.add_bos_token = cfg.get("add_bos_token").and_then(Value::as_bool).unwrap_or(false);
        }
        // A separate chat_template.jinja (newer transformers) wins if present.
        if let Some(dir) = dir {
            let jinja = dir.join("chat_template.jinja");
            if jinja.exists() {
                c.chat_template = Some(std::fs::read_to_string(&jinja)?);
            }
        }
        Ok(c)
    }
}

/// A SentencePiece model file (`tokenizer.model`, Mistral's `tokenizer.model.v3`).
fn is_sentencepiece_model(path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    name.ends_with(".model") || name.contains(".model.")
}

impl TokenizerInfo {
    pub fn load(path: &Path) -> Result<TokenizerInfo> {
        let (json_path, config_path) = if path.is_dir() {
            let j = ["tokenizer.json", "tokenizer.json.gz"].iter().map(|n| path.join(n)).find(|p| p.exists());
            let Some(j) = j else {
                if path.join("tokenizer.model").exists() {
                    return Self::from_sentencepiece(
                        path,
                        &path.join("tokenizer.model"),
                        Some(path.join("tokenizer_config.json")),
                    );
                }
                bail!("{}: no tokenizer.json (or tokenizer.model) in this directory; pass a tokenizer.json file or a Hugging Face model directory", path.display());
            };
            (j, Some(path.join("tokenizer_config.json")))
        } else if path.exists() {
            if path.extension().is_some_and(|e| e == "gguf") {
                return Self::from_gguf(path);
            }
            let config = path.parent().map(|d| d.join("tokenizer_config.json"));
            if is_sentencepiece_model(path) {
                return Self::from_sentencepiece(path, path, config);
            }
            (path.to_path_buf(), config)
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
        let Config { specials, chat_template, add_bos_token } = Config::read(config_path, json_path.parent())?;
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

    /// A SentencePiece `model` file (in the directory `path` or the file itself), rebuilt as the GGUF
    /// SentencePiece tokenizer is; specials and chat template from tokenizer_config.json if there.
    fn from_sentencepiece(path: &Path, model: &Path, config: Option<PathBuf>) -> Result<TokenizerInfo> {
        let m = super::sentencepiece_model::SentencePieceModel::read(model)?;
        let json = super::gguf::spm::tokenizer_json(&m.vocab, m.add_dummy_prefix).to_string();
        let tokenizer = Tokenizer::from_bytes(json.as_bytes()).map_err(|e| {
            anyhow::anyhow!("{}: cannot build a tokenizer from the SentencePiece model: {e}", model.display())
        })?;
        let mut c = Config::read(config, model.parent())?;
        for (k, v) in m.specials() {
            c.specials.entry(k).or_insert(v);
        }
        let vocab_size = tokenizer.get_vocab_size(true);
        Ok(TokenizerInfo {
            tokenizer,
            path: path.to_path_buf(),
            sha256: crate::digest::sha256(json.as_bytes()),
            specials: c.specials,
            chat_template: c.chat_template,
            add_bos_token: c.add_bos_token,
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
            add_bos_token: g.add_bos,
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
