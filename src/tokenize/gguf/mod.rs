//! A Hugging Face tokenizer rebuilt from a GGUF file's vocabulary (`tokenizer.ggml.*`), so that it
//! tokenises as llama.cpp does: byte-level BPE (`gpt2` models) with the family's pre-tokenizer
//! ([`pre`], by `tokenizer.ggml.pre`) in [`bpe`], and SentencePiece (`llama` models: Llama 2,
//! Mistral, Gemma, Phi-3) as BPE with byte fallback, merged by score, in [`spm`]. Control,
//! user-defined and unknown tokens are matched whole in text (llama.cpp's special-token partition
//! of a rendered chat template); the special tokens and `tokenizer.chat_template` come along.

pub mod bpe;
pub mod pre;
pub mod spm;

use crate::gguf::metadata::{open, string_of, strings_of, u32_of, Metadata};
use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value as J};
use std::path::Path;

pub struct GgufTokenizer {
    /// tokenizer.json text.
    pub json: String,
    pub specials: Map<String, J>,
    pub chat_template: Option<String>,
    /// Whether llama.cpp puts a BOS in front of text: `tokenizer.ggml.add_bos_token`, or its
    /// default for the tokenizer (SentencePiece yes; BPE only for Llama 3, Tekken and Chameleon).
    pub add_bos: bool,
}

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
pub mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// The BPE model's settings that differ between GGUF tokenizers, and its merges.
struct BpeModel {
    unk_token: Option<String>,
    fuse_unk: bool,
    byte_fallback: bool,
    ignore_merges: bool,
    merges: J,
}

/// The vocabulary as the file holds it, its arrays checked to agree.
pub struct Vocab {
    pub tokens: Vec<String>,
    pub types: Vec<i32>,
    /// SentencePiece scores (empty for BPE files without them).
    pub scores: Vec<f32>,
    /// The file's general.name, lower case (llama.cpp sets some token attributes by it).
    pub model_name: String,
}

impl Vocab {
    fn read(md: &Metadata, path: &Path) -> Result<Vocab> {
        let field = |key: &str| format!("{}: {key}", path.display());
        let tokens = strings_of(md, "tokenizer.ggml.tokens").with_context(|| field("tokenizer.ggml.tokens"))?;
        let n = tokens.len();
        let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
            Some(v) => v.to_vec()?.iter().map(|t| t.to_i32().unwrap_or(token_type::NORMAL)).collect(),
            None => vec![token_type::NORMAL; n],
        };
        let scores: Vec<f32> = match md.get("tokenizer.ggml.scores") {
            Some(v) => v.to_vec()?.iter().map(|s| s.to_f32().unwrap_or(0.0)).collect(),
            None => vec![],
        };
        for (key, len) in [("tokenizer.ggml.token_type", types.len()), ("tokenizer.ggml.scores", scores.len())] {
            if len != n && !(key.ends_with("scores") && len == 0) {
                bail!(
                    "{}: {key} has {len} entries but tokenizer.ggml.tokens has {n}; the file's vocabulary is damaged",
                    path.display()
                );
            }
        }
        let model_name = string_of(md, "general.name").unwrap_or_default().to_lowercase();
        let mut vocab = Vocab { tokens, types, scores, model_name };
        vocab.promote_as_llama_cpp_does();
        Ok(vocab)
    }

    /// llama.cpp treats tokens that look like end-of-turn, end-of-generation and fill-in-the-middle
    /// markers as control tokens whatever type the file gives them (so `</s>` in Qwen2's vocabulary
    /// is matched whole), and gpt-oss's channel markers as user-defined; the same here.
    fn promote_as_llama_cpp_does(&mut self) {
        const CONTROL_LOOKING: &[&str] = &[
            "<|eot_id|>",
            "<|im_end|>",
            "<|end|>",
            "<|return|>",
            "<|call|>",
            "<|flush|>",
            "<|calls|>",
            "<end_of_turn>",
            "<|endoftext|>",
            "</s>",
            "<|eom_id|>",
            "<EOT>",
            "_<EOT>",
            "[EOT]",
            "[EOS]",
            "<|end_of_text|>",
            "<end_of_utterance>",
            "<eos>",
            "<turn|>",
            "<|tool_response>",
            "<｜end▁of▁sentence｜>",
            "[e~[",
            "<|fim_prefix|>",
            "<fim-prefix>",
            "<fim_prefix>",
            "<｜fim▁begin｜>",
            "<PRE>",
            "▁<PRE>",
            "<|code_prefix|>",
            "<|prefix|>",
            "<|fim_suffix|>",
            "<fim-suffix>",
            "<fim_suffix>",
            "<｜fim▁hole｜>",
            "<SUF>",
            "▁<SUF>",
            "<|code_suffix|>",
            "<|suffix|>",
            "<|fim_middle|>",
            "<fim-middle>",
            "<fim_middle>",
            "<｜fim▁end｜>",
            "<MID>",
            "▁<MID>",
            "<|code_middle|>",
            "<|middle|>",
            "<|fim_pad|>",
            "<fim-pad>",
            "<fim_pad>",
            "<PAD>",
            "[PAD]",
            "<|fim_repo|>",
            "<|repo_name|>",
            "<fim-repo>",
            "<REPO>",
            "<reponame>",
            "<|file_sep|>",
        ];
        const GPT_OSS_USER_DEFINED: &[&str] = &["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"];
        // Gemma 4 and PLaMo keep `</s>` a normal token.
        let normal_s = self.tokens.iter().any(|t| t == "<|tool_response>" || t == "<|plamo:eos|>");
        for (t, ty) in self.tokens.iter().zip(self.types.iter_mut()) {
            if GPT_OSS_USER_DEFINED.contains(&t.as_str()) {
                *ty = token_type::USER_DEFINED;
            } else if CONTROL_LOOKING.contains(&t.as_str()) && !(normal_s && t == "</s>") {
                *ty = token_type::CONTROL;
            }
        }
    }

    /// tokenizer.json for a BPE model over this vocabulary: the parts every GGUF tokenizer shares
    /// (the vocabulary, the special tokens matched whole) around the ones that differ.
    fn tokenizer_json(&self, normalizer: J, pre_tokenizer: J, decoder: J, model: BpeModel) -> J {
        let vocab: Map<String, J> = self.tokens.iter().enumerate().map(|(i, t)| (t.clone(), J::from(i))).collect();
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": self.added_tokens(),
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": decoder,
            "model": {"type": "BPE", "dropout": null, "unk_token": model.unk_token, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": model.fuse_unk, "byte_fallback": model.byte_fallback,
                      "ignore_merges": model.ignore_merges, "vocab": vocab, "merges": model.merges}
        })
    }

    fn is_special(&self, id: usize) -> bool {
        use token_type::*;
        matches!(self.types[id], CONTROL | USER_DEFINED | UNKNOWN)
    }

    /// Control, user-defined and unknown tokens, matched whole in text before the model runs (as
    /// llama.cpp partitions text on them); Phi-3's strip the spaces after them, as llama.cpp sets.
    fn added_tokens(&self) -> Vec<J> {
        let phi3 = self.model_name.contains("phi-3") || self.model_name.contains("phi3");
        (0..self.tokens.len())
            .filter(|&i| self.is_special(i))
            .map(|i| {
                let t = &self.tokens[i];
                let rstrip = phi3 && !matches!(t.as_str(), "<unk>" | "<s>" | "<|endoftext|>");
                json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": rstrip,
                       "normalized": false, "special": self.types[i] != token_type::USER_DEFINED})
            })
            .collect()
    }
}

pub fn read(path: &Path) -> Result<GgufTokenizer> {
    let (_, content) = open(path)?;
    let md = &content.metadata;
    let model = string_of(md, "tokenizer.ggml.model").unwrap_or_default();
    let vocab = Vocab::read(md, path)?;
    let pre = string_of(md, "tokenizer.ggml.pre").unwrap_or_default();
    let merges = || {
        strings_of(md, "tokenizer.ggml.merges")
            .with_context(|| format!("{}: a BPE vocabulary needs tokenizer.ggml.merges", path.display()))
    };
    let tok = match model.as_str() {
        "gpt2" => bpe::tokenizer_json(&vocab, &merges()?, &pre).with_context(|| format!("{}", path.display()))?,
        "gemma4" => bpe::gemma4_json(&vocab, &merges()?),
        "llama" => {
            if vocab.scores.is_empty() {
                bail!("{}: a SentencePiece vocabulary needs tokenizer.ggml.scores; the file has none", path.display());
            }
            let add_space_prefix =
                md.get("tokenizer.ggml.add_space_prefix").and_then(|v| v.to_bool().ok()).unwrap_or(true);
            spm::tokenizer_json(&vocab, add_space_prefix)
        }
        other => bail!(
            "{}: GGUF tokenizer model '{other}' is not supported (byte-level BPE 'gpt2', SentencePiece 'llama' \
             and 'gemma4' are); pass the model's tokenizer.json",
            path.display()
        ),
    };
    let mut specials = Map::new();
    for (key, name) in [("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"), ("padding", "pad_token")]
    {
        if let Some(id) = u32_of(md, &format!("tokenizer.ggml.{key}_token_id")) {
            if let Some(t) = vocab.tokens.get(id as usize) {
                specials.insert(name.to_string(), J::from(t.clone()));
            }
        }
    }
    let chat_template = string_of(md, "tokenizer.chat_template");
    let default_bos = model == "llama" || pre::adds_bos(&pre);
    let add_bos = md.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(default_bos);
    Ok(GgufTokenizer { json: tok.to_string(), specials, chat_template, add_bos })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::Value as G;

    fn strings(v: &[&str]) -> G {
        G::Array(v.iter().map(|s| G::String(s.to_string())).collect())
    }

    /// A vocabulary-only GGUF with `md`, read back as a tokenizer.
    fn read_with(md: Vec<(&str, G)>) -> Result<GgufTokenizer> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vocab.gguf");
        let md: Vec<(String, G)> = md.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        crate::gguf::writer::write(&path, &md, &[], |_| Ok(vec![])).unwrap();
        read(&path)
    }

    fn spm(md: &mut Vec<(&str, G)>) {
        md.push(("tokenizer.ggml.model", G::String("llama".into())));
        md.push(("tokenizer.ggml.tokens", strings(&["<unk>", "<s>", "▁a", "▁", "a", "<0x62>"])));
        md.push(("tokenizer.ggml.token_type", G::Array([2, 3, 1, 1, 1, 6].map(G::I32).to_vec())));
    }

    #[test]
    fn sentencepiece_merges_by_score_and_falls_back_to_bytes() {
        let mut md = vec![];
        spm(&mut md);
        md.push(("tokenizer.ggml.scores", G::Array([0., 0., -1., -2., -3., 0.].map(G::F32).to_vec())));
        let g = read_with(md).unwrap();
        let tok = tokenizers::Tokenizer::from_bytes(g.json.as_bytes()).unwrap();
        // Each piece of text gets the space prefix, "▁" + "a" merge into "▁a", "b" has no token and
        // falls back to its byte, "<s>" is matched whole.
        let ids = tok.encode("a ab<s>", false).unwrap().get_ids().to_vec();
        assert_eq!(ids, vec![2, 2, 5, 1]);
        assert_eq!(tok.decode(&ids, false).unwrap(), "a ab<s>");
    }

    #[test]
    fn damaged_vocabularies_are_errors_naming_the_file_and_the_field() {
        let mut md = vec![];
        spm(&mut md);
        let e = read_with(md).err().unwrap().to_string();
        assert!(e.contains("vocab.gguf") && e.contains("needs tokenizer.ggml.scores"), "{e}");
        let mut md = vec![];
        spm(&mut md);
        md.push(("tokenizer.ggml.scores", G::Array([0f32, 1.].map(G::F32).to_vec())));
        let e = read_with(md).err().unwrap().to_string();
        assert!(e.contains("tokenizer.ggml.scores has 2 entries but tokenizer.ggml.tokens has 6"), "{e}");
        let bpe = |pre: &str, merges: bool| {
            let mut md = vec![
                ("tokenizer.ggml.model", G::String("gpt2".into())),
                ("tokenizer.ggml.pre", G::String(pre.into())),
                ("tokenizer.ggml.tokens", strings(&["a", "b", "ab"])),
            ];
            if merges {
                md.push(("tokenizer.ggml.merges", strings(&["a b"])));
            }
            read_with(md).err().map(|e| format!("{e:#}"))
        };
        assert!(bpe("qwen2", true).is_none());
        assert!(bpe("qwen2", false).unwrap().contains("needs tokenizer.ggml.merges"));
        let e = bpe("my-own", true).unwrap();
        assert!(e.contains("'my-own' is a pre-tokenizer tunekit does not know") && e.contains("llama-bpe"), "{e}");
        assert!(bpe("kimi-k2", true).unwrap().contains("code of its own"));
        // A truncated file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cut.gguf");
        let mut md = vec![];
        spm(&mut md);
        let md: Vec<(String, G)> = md.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        crate::gguf::writer::write(&path, &md, &[], |_| Ok(vec![])).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let e = format!("{:#}", read(&path).err().unwrap());
        assert!(e.contains("cut.gguf: not a GGUF file"), "{e}");
    }
}
