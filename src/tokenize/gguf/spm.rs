//! SentencePiece from a GGUF vocabulary (`tokenizer.ggml.model = llama`: Llama 2, Mistral, Gemma,
//! Phi-3) as llama.cpp's SPM tokenizer runs it: spaces become `▁` (and a `▁` goes in front of each
//! piece of text when `add_space_prefix`), adjacent symbols merge highest score first into tokens
//! of the vocabulary, and a character no token covers falls back to its UTF-8 bytes (`<0x0A>`).
//! Built as a BPE whose merges are every split of every token into two tokens, ranked by the
//! merged token's score (the construction transformers' SentencePiece converter uses).

use super::{token_type, BpeModel, Vocab};
use serde_json::{json, Value};
use std::collections::HashMap;

/// The merges: each token's splits into two vocabulary tokens, best score first (ties in the
/// order of the vocabulary, then of the two parts' ids).
fn merges(vocab: &Vocab) -> Vec<(String, String)> {
    let id: HashMap<&str, usize> = vocab.tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut out: Vec<(f32, usize, usize, usize)> = vec![];
    for (t, text) in vocab.tokens.iter().enumerate() {
        if !matches!(vocab.types[t], token_type::NORMAL | token_type::USER_DEFINED | token_type::UNUSED) {
            continue;
        }
        let mut local: Vec<(usize, usize)> = text
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| Some((*id.get(&text[..at])?, *id.get(&text[at..])?)))
            .collect();
        local.sort();
        out.extend(local.into_iter().map(|(l, r)| (vocab.scores[t], t, l, r)));
    }
    // Stable: equal scores keep the vocabulary's order.
    out.sort_by(|a, b| b.0.total_cmp(&a.0));
    out.into_iter().map(|(_, _, l, r)| (vocab.tokens[l].clone(), vocab.tokens[r].clone())).collect()
}

/// The decoder back to text: `▁` as spaces, `<0xNN>` tokens as their bytes, and with a space
/// prefix the first space dropped.
pub fn decoder(strip_space_prefix: bool) -> Value {
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if strip_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    json!({"type": "Sequence", "decoders": decoders})
}

/// tokenizer.json for a SentencePiece vocabulary.
pub fn tokenizer_json(vocab: &Vocab, add_space_prefix: bool) -> Value {
    let unk = (0..vocab.tokens.len()).find(|&i| vocab.types[i] == token_type::UNKNOWN).map(|i| vocab.tokens[i].clone());
    let mut normalizers = vec![];
    if add_space_prefix {
        normalizers.push(json!({"type": "Prepend", "prepend": "▁"}));
    }
    normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
    let merges: Vec<Value> = merges(vocab).into_iter().map(|(l, r)| json!([l, r])).collect();
    vocab.tokenizer_json(
        json!({"type": "Sequence", "normalizers": normalizers}),
        Value::Null,
        decoder(add_space_prefix),
        BpeModel { unk_token: unk, fuse_unk: true, byte_fallback: true, ignore_merges: false, merges: json!(merges) },
    )
}
