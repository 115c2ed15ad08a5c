//! A SentencePiece `tokenizer.model` (the protobuf a Hugging Face directory ships when it has no
//! tokenizer.json: Llama 2, Mistral) read into the vocabulary the GGUF SentencePiece construction
//! builds from ([`super::gguf::spm`]): pieces with their scores and types, whether a `▁` goes in
//! front of text (`add_dummy_prefix`), and the unk/bos/eos/pad ids. BPE-type models only (what
//! LLMs ship); a Unigram model or one that rewrites whitespace is refused by name.

use super::gguf::{token_type, Vocab};
use anyhow::{bail, Context, Result};

/// What a tokenizer.model holds that tunekit uses.
pub struct SentencePieceModel {
    pub vocab: Vocab,
    pub add_dummy_prefix: bool,
    /// unk, bos, eos and pad ids (-1: none).
    pub special_ids: [i64; 4],
}

/// One protobuf field: its number and its value (a varint, 32-bit or length-delimited bytes).
enum Field<'a> {
    Varint(u64),
    Fixed32(u32),
    Bytes(&'a [u8]),
}

/// The fields of a protobuf message, in order.
fn fields(mut buf: &[u8]) -> Result<Vec<(u64, Field<'_>)>> {
    fn varint(buf: &mut &[u8]) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = buf.split_first().context("the message ends inside a number")?;
            *buf = rest;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        bail!("a number longer than 10 bytes")
    }
    let mut out = vec![];
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let value = match key & 7 {
            0 => Field::Varint(varint(&mut buf)?),
            1 => {
                let (_, rest) = buf.split_at_checked(8).context("the message ends inside a 64-bit field")?;
                buf = rest;
                continue;
            }
            2 => {
                let n = varint(&mut buf)? as usize;
                let (b, rest) = buf.split_at_checked(n).context("the message ends inside a field")?;
                buf = rest;
                Field::Bytes(b)
            }
            5 => {
                let (b, rest) = buf.split_at_checked(4).context("the message ends inside a 32-bit field")?;
                buf = rest;
                Field::Fixed32(u32::from_le_bytes(b.try_into().expect("4 bytes")))
            }
            w => bail!("unknown wire type {w}"),
        };
        out.push((key >> 3, value));
    }
    Ok(out)
}

impl SentencePieceModel {
    pub fn read(path: &std::path::Path) -> Result<SentencePieceModel> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&bytes).with_context(|| format!("{}: not a SentencePiece model", path.display()))
    }

    fn parse(bytes: &[u8]) -> Result<SentencePieceModel> {
        let (mut tokens, mut types, mut scores) = (vec![], vec![], vec![]);
        let (mut model_type, mut add_dummy_prefix, mut remove_extra_whitespaces) = (1u64, true, true);
        let mut special_ids = [0i64, 1, 2, -1];
        for (number, field) in fields(bytes)? {
            match (number, field) {
                (1, Field::Bytes(piece)) => {
                    let (mut text, mut score, mut ty) = (String::new(), 0f32, token_type::NORMAL);
                    for (n, f) in fields(piece)? {
                        match (n, f) {
                            (1, Field::Bytes(s)) => {
                                text = String::from_utf8(s.to_vec()).context("a piece is not UTF-8")?
                            }
                            (2, Field::Fixed32(s)) => score = f32::from_bits(s),
                            (3, Field::Varint(t)) => ty = t as i32,
                            _ => {}
                        }
                    }
                    tokens.push(text);
                    scores.push(score);
                    types.push(ty);
                }
                (2, Field::Bytes(trainer)) => {
                    for (n, f) in fields(trainer)? {
                        match (n, f) {
                            (3, Field::Varint(t)) => model_type = t,
                            (40..=43, Field::Varint(id)) => special_ids[(n - 40) as usize] = id as i32 as i64,
                            _ => {}
                        }
                    }
                }
                (3, Field::Bytes(normalizer)) => {
                    for (n, f) in fields(normalizer)? {
                        match (n, f) {
                            (3, Field::Varint(v)) => add_dummy_prefix = v != 0,
                            (4, Field::Varint(v)) => remove_extra_whitespaces = v != 0,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if tokens.is_empty() {
            bail!("no pieces");
        }
        if model_type != 2 {
            bail!(
                "a {} SentencePiece model; tunekit reads BPE ones (pass the model's tokenizer.json)",
                match model_type {
                    1 => "Unigram",
                    3 => "word",
                    4 => "character",
                    _ => "non-BPE",
                }
            );
        }
        if remove_extra_whitespaces {
            bail!("the model collapses runs of whitespace (remove_extra_whitespaces), which tunekit does not do; pass the model's tokenizer.json");
        }
        let vocab = Vocab { tokens, types, scores, model_name: String::new() };
        Ok(SentencePieceModel { vocab, add_dummy_prefix, special_ids })
    }

    /// The special tokens by transformers' names, from the trainer's ids.
    pub fn specials(&self) -> serde_json::Map<String, serde_json::Value> {
        ["unk_token", "bos_token", "eos_token", "pad_token"]
            .iter()
            .zip(self.special_ids)
            .filter_map(|(name, id)| {
                Some((name.to_string(), self.vocab.tokens.get(usize::try_from(id).ok()?)?.clone().into()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A length-delimited protobuf field.
    fn bytes_field(n: u8, b: &[u8]) -> Vec<u8> {
        [vec![n << 3 | 2, b.len() as u8], b.to_vec()].concat()
    }

    fn model(model_type: u8, remove_extra_whitespaces: u8) -> Vec<u8> {
        let piece = |text: &str, score: f32, ty: u8| {
            let body =
                [bytes_field(1, text.as_bytes()), vec![2 << 3 | 5], score.to_le_bytes().to_vec(), vec![3 << 3, ty]]
                    .concat();
            bytes_field(1, &body)
        };
        // bos_id (41) takes a two-byte key: 41 << 3 = 328 = 0xC8 0x02.
        let trainer = bytes_field(2, &[3 << 3, model_type, 0xC8, 0x02, 2]);
        let normalizer = bytes_field(3, &[3 << 3, 0, 4 << 3, remove_extra_whitespaces]);
        [piece("<unk>", 0.0, 2), piece("<s>", 0.0, 3), piece("▁a", -1.5, 1), trainer, normalizer].concat()
    }

    #[test]
    fn pieces_scores_types_and_settings_are_read() {
        let m = SentencePieceModel::parse(&model(2, 0)).unwrap();
        assert_eq!(m.vocab.tokens, ["<unk>", "<s>", "▁a"]);
        assert_eq!(m.vocab.scores, [0.0, 0.0, -1.5]);
        assert_eq!(m.vocab.types, [token_type::UNKNOWN, token_type::CONTROL, token_type::NORMAL]);
        assert!(!m.add_dummy_prefix);
        assert_eq!(m.special_ids, [0, 2, 2, -1], "bos_id read from the trainer spec");
        assert!(SentencePieceModel::parse(&model(1, 0)).err().unwrap().to_string().contains("Unigram"));
        assert!(SentencePieceModel::parse(&model(2, 1))
            .err()
            .unwrap()
            .to_string()
            .contains("remove_extra_whitespaces"));
        assert!(SentencePieceModel::parse(&model(2, 0)[..7]).is_err(), "a cut file");
    }
}
