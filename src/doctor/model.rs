//! Checks against the model the shards will train: the same vocabulary token for token (the
//! tokenizer file may differ in bytes, as a GGUF's rebuilt one does, and still be the same), and
//! the same chat template (the one transformers, llama.cpp and Ollama will prompt the tuned model
//! with).

use super::{Findings, Severity};
use crate::pack::manifest::Manifest;
use crate::tokenize::TokenizerInfo;

/// A finding about the shard directory as a whole: its manifest.
fn in_manifest(detail: String) -> super::Location {
    super::Location { split: "train", file: "manifest.json".into(), row: 0, segment: None, token: None, detail }
}

/// Compares the shards' tokenizer (when it could be loaded) and template with the model's.
pub fn compare(manifest: &Manifest, shards_tok: Option<&TokenizerInfo>, model_tok: &TokenizerInfo, f: &mut Findings) {
    if manifest.tokenizer.sha256 != model_tok.sha256 {
        match shards_tok {
            Some(t) => {
                let (mine, theirs) = (t.tokenizer.get_vocab(true), model_tok.tokenizer.get_vocab(true));
                let mut differ: Vec<(&String, &u32)> =
                    mine.iter().filter(|(tok, id)| theirs.get(*tok) != Some(id)).collect();
                differ.sort_by_key(|(_, id)| **id);
                let missing = theirs.keys().filter(|k| !mine.contains_key(*k)).count();
                if !differ.is_empty() || missing > 0 {
                    let example = differ
                        .first()
                        .map(|(tok, id)| {
                            format!("; e.g. {tok:?} is id {id} in the shards, {:?} in the model", theirs.get(*tok))
                        })
                        .unwrap_or_default();
                    f.add(
                        "tokenizer_differs",
                        Severity::Error,
                        "the shards were tokenized with another vocabulary than the model's",
                        "prepare the shards with the model's own tokenizer (--tokenizer MODEL_DIR or the GGUF file)",
                        Some(in_manifest(format!(
                            "{} token(s) of {} differ and the model has {missing} the shards' tokenizer lacks{example}",
                            differ.len(),
                            manifest.tokenizer.path
                        ))),
                    );
                }
            }
            None => f.add(
                "tokenizer_unverified",
                Severity::Warning,
                "the shards' tokenizer is not where the manifest says, and its sha256 differs from the model's",
                "pass the tokenizer the shards were prepared with as --tokenizer, to compare vocabularies",
                None,
            ),
        }
    }
    let Some(model_template) = &model_tok.chat_template else { return };
    let sha = crate::digest::sha256(model_template.as_bytes());
    if sha != manifest.template.sha256 {
        f.add(
            "template_differs",
            Severity::Warning,
            "the shards were rendered with another chat template than the model's own, which transformers' \
             apply_chat_template, llama.cpp and Ollama will prompt the tuned model with",
            "prepare with the model's template (leave out --template and pass the model as --tokenizer), or ship the \
             training template with the tuned model",
            Some(in_manifest(format!(
                "template '{}' (sha256 {}) vs the model's (sha256 {})",
                manifest.template.name,
                &manifest.template.sha256[..12.min(manifest.template.sha256.len())],
                &sha[..12]
            ))),
        );
    }
}
