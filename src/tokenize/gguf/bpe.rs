//! BPE from a GGUF vocabulary. Byte-level (`tokenizer.ggml.model = gpt2`): the vocabulary and
//! merges as the file has them (tokens already in GPT-2's byte-to-character encoding), the family's
//! split expressions from [`super::pre`] before GPT-2's byte encoding, and the byte-level decoder.
//! Gemma 4's (`gemma4`): merges over raw UTF-8 with spaces as `▁`, text split only at newlines,
//! bytes no token covers as `<0xNN>` tokens.

use super::pre::{by_name, KNOWN, NOT_YET};
use super::{BpeModel, Vocab};
use anyhow::{bail, Result};
use serde_json::{json, Value};

/// tokenizer.json for a byte-level BPE vocabulary with llama.cpp's pre-tokenizer `pre`.
pub fn tokenizer_json(vocab: &Vocab, merges: &[String], pre: &str) -> Result<Value> {
    let Some(p) = by_name(pre) else {
        if NOT_YET.contains(&pre) {
            bail!(
                "tokenizer.ggml.pre = '{pre}': llama.cpp splits this family's text with code of its own, which tunekit \
                 does not have yet; pass the model's tokenizer.json"
            );
        }
        bail!("tokenizer.ggml.pre = '{pre}' is a pre-tokenizer tunekit does not know (it knows {})", KNOWN.join(", "));
    };
    let splits: Vec<Value> = p
        .regexes
        .iter()
        .map(|r| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false}))
        .chain(std::iter::once(
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}),
        ))
        .collect();
    Ok(vocab.tokenizer_json(
        Value::Null,
        json!({"type": "Sequence", "pretokenizers": splits}),
        json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
        BpeModel {
            unk_token: None,
            fuse_unk: false,
            byte_fallback: false,
            ignore_merges: p.ignore_merges,
            merges: json!(merges),
        },
    ))
}

/// tokenizer.json for Gemma 4's vocabulary (llama.cpp's `gemma4` pre-tokenizer).
pub fn gemma4_json(vocab: &Vocab, merges: &[String]) -> Value {
    // llama.cpp splits a merge at the first space after its first character.
    let pairs: Vec<Value> = merges
        .iter()
        .filter_map(|m| {
            let at = m.char_indices().skip(1).find(|(_, c)| *c == ' ')?.0;
            Some(json!([&m[..at], &m[at + 1..]]))
        })
        .collect();
    vocab.tokenizer_json(
        json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}),
        json!({"type": "Split", "pattern": {"Regex": "[^\\n]+|[\\n]+"}, "behavior": "Isolated", "invert": false}),
        super::spm::decoder(false),
        BpeModel { unk_token: None, fuse_unk: false, byte_fallback: true, ignore_merges: false, merges: json!(pairs) },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every pre-tokenizer llama.cpp names builds (its expressions compile as the tokenizers crate
    /// reads them) and splits text with numbers, contractions, CJK and whitespace runs.
    #[test]
    fn every_known_pre_tokenizer_builds_and_splits() {
        // A byte-level vocabulary of single bytes: every text tokenises, one token per byte.
        let bytes: Vec<String> =
            tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet().into_iter().map(|c| c.to_string()).collect();
        let vocab = Vocab {
            types: vec![super::super::token_type::NORMAL; bytes.len()],
            tokens: bytes,
            scores: vec![],
            model_name: String::new(),
        };
        let text = "It's 12345 apples, y'all!\\n\\n  中文 Ünïcödé\\t\\tend";
        for pre in KNOWN {
            let json = tokenizer_json(&vocab, &[], pre).unwrap().to_string();
            let tok = tokenizers::Tokenizer::from_bytes(json.as_bytes()).unwrap_or_else(|e| panic!("{pre}: {e}"));
            let enc = tok.encode(text, false).unwrap_or_else(|e| panic!("{pre}: {e}"));
            assert_eq!(enc.len(), text.len(), "{pre}: one token per byte");
            assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text, "{pre}");
        }
    }
}
