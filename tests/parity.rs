//! Chat-template parity: tunekit's rendering and token ids equal transformers'
//! `apply_chat_template(messages, tokenize=True)` (fixtures made by
//! tests/fixtures/parity/make_fixtures.py) for real tokenizers and templates.

mod common;

use serde_json::Value;
use std::path::PathBuf;
use tunekit::record::{Conversation, Message};
use tunekit::template::chat::ChatTemplate;
use tunekit::tokenize::{LossMode, TokenizerInfo, Tokenizing};

fn tokenizer_path(name: &str) -> Option<PathBuf> {
    match name {
        "qwen3" => Some(common::root().join("datasets/tokenizers/qwen3")),
        "mistral" => Some(common::root().join("tests/fixtures/tokenizers/mistral")),
        "llama3" => common::asset("llama3_1/package/models"),
        other => panic!("unknown tokenizer {other}"),
    }
}

fn check_case(case: &str) -> usize {
    let path = common::root().join(format!("tests/fixtures/parity/{case}.json"));
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let Some(tp) = tokenizer_path(fx["tokenizer"].as_str().unwrap()) else { return 0 };
    let tok = TokenizerInfo::load(&tp).unwrap();
    let mut tpl = match fx["template"].as_str() {
        Some(f) => {
            ChatTemplate::new(f, &std::fs::read_to_string(common::root().join(f)).unwrap(), tok.specials.clone())
                .unwrap()
        }
        None => ChatTemplate::new("tokenizer", tok.chat_template.as_ref().unwrap(), tok.specials.clone()).unwrap(),
    };
    tpl.vars = fx["vars"].as_object().cloned().unwrap_or_default();
    let convs: Value = serde_json::from_str(
        &std::fs::read_to_string(common::root().join("tests/fixtures/parity/conversations.json")).unwrap(),
    )
    .unwrap();
    let tk = Tokenizing { tok: &tok, template: &tpl, mode: LossMode::Assistant };
    let mut n = 0;
    for (c, expected) in convs.as_array().unwrap().iter().zip(fx["results"].as_array().unwrap()) {
        let msgs: Vec<Message> = serde_json::from_value(c["messages"].clone()).unwrap();
        let mut conv = Conversation::new(c["name"].as_str().unwrap().to_string(), msgs.clone());
        conv.tools = c.get("tools").cloned();
        let rendered = tpl.render(&msgs, conv.tools.as_ref(), false);
        if let Some(err) = expected.get("error") {
            assert!(
                rendered.is_err(),
                "{case}/{}: transformers refused this conversation ({err}) but tunekit rendered it",
                c["name"]
            );
            continue;
        }
        let text = rendered.unwrap_or_else(|e| panic!("{case}/{}: {e:#}", c["name"]));
        assert_eq!(text, expected["text"].as_str().unwrap(), "{case}/{}: rendered text differs", c["name"]);
        let sample = tk.sample(&conv).unwrap_or_else(|e| panic!("{case}/{}: {e:?}", c["name"]));
        let want: Vec<u32> = serde_json::from_value(expected["ids"].clone()).unwrap();
        if sample.input_ids != want {
            let at = sample
                .input_ids
                .iter()
                .zip(&want)
                .position(|(a, b)| a != b)
                .unwrap_or(want.len().min(sample.input_ids.len()));
            panic!(
                "{case}/{}: token ids differ at position {at} (got {} ids, want {})",
                c["name"],
                sample.input_ids.len(),
                want.len()
            );
        }
        // No doubled BOS: the template's bos_token is the only one.
        if let Some(bos) = tok.special("bos_token").and_then(|b| tok.tokenizer.token_to_id(b)) {
            assert!(sample.input_ids.windows(2).all(|w| !(w[0] == bos && w[1] == bos)), "{case}: BOS doubled");
        }
        n += 1;
    }
    n
}

#[test]
fn qwen3_own_template() {
    assert_eq!(check_case("qwen3"), 12);
}

#[test]
fn llama3_own_template() {
    check_case("llama3");
}

#[test]
fn llama_cpp_templates_with_matching_vocabularies() {
    for case in ["qwen2.5-template", "qwq-template", "llama3.2-template", "llama3.3-template"] {
        check_case(case);
    }
}

#[test]
fn mistral_sentencepiece_tokenizer() {
    assert_eq!(check_case("mistral-template"), 12);
}
