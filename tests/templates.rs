//! The chat templates llama.cpp ships (70 real ones: Llama 3.x, Qwen2.5/3, Mistral, Phi-3.5, Gemma,
//! SmolLM3, DeepSeek, ...; the llama-cpp-python 0.3.36 sdist, `.ci/fetch-assets`) render with
//! tunekit exactly as transformers renders them, wherever transformers renders them. The expected
//! texts come from transformers' own renderer (`tests/fixtures/templates/make_renders.py`), with the
//! date fixed by SOURCE_DATE_EPOCH on both sides.

mod common;

use serde_json::{Map, Value};
use tunekit::record::Message;
use tunekit::template::chat::ChatTemplate;

#[test]
fn llama_cpp_templates_render_as_transformers_renders_them() {
    let Some(dir) = common::asset("llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/models/templates") else { return };
    let fixture = common::root().join("tests/fixtures/templates/llama_cpp_renders.json");
    let f: Value = serde_json::from_slice(&std::fs::read(fixture).unwrap()).unwrap();
    let specials: Map<String, Value> = serde_json::from_value(f["specials"].clone()).unwrap();
    let conversations: Vec<(Vec<Message>, bool)> = serde_json::from_value(f["conversations"].clone()).unwrap();
    // 2024-07-26T12:00:00Z, the date the fixture was rendered at.
    std::env::set_var("SOURCE_DATE_EPOCH", "1721995200");
    let (mut same, mut failures) = (0, vec![]);
    for (name, renders) in f["renders"].as_object().unwrap() {
        let source = std::fs::read_to_string(dir.join(name)).unwrap();
        let tpl = match ChatTemplate::new(name, &source, specials.clone()) {
            Ok(t) => t,
            Err(e) => {
                failures.push(format!("{name}: does not parse: {e:#}"));
                continue;
            }
        };
        for (i, ((messages, gen), want)) in conversations.iter().zip(renders.as_array().unwrap()).enumerate() {
            let Some(want) = want["text"].as_str() else { continue }; // transformers cannot render it either
            match tpl.render(messages, None, *gen) {
                Ok(got) if got == want => same += 1,
                Ok(got) => failures.push(format!("{name} #{i}: differs\n--- transformers\n{want}\n--- tunekit\n{got}")),
                Err(e) => failures.push(format!("{name} #{i}: {e:#}")),
            }
        }
    }
    assert!(failures.is_empty(), "{same} renders equal; {} not:\n{}", failures.len(), failures.join("\n\n"));
    assert!(same >= 190, "only {same} renders compared");
}
