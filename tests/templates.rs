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

/// gpt-oss's conversation with reasoning: an earlier turn and the last one, each with `thinking`.
fn harmony_conversation() -> Vec<Message> {
    let mut msgs = vec![
        Message::new("system", "Answer briefly."),
        Message::new("user", "What is 2+2?"),
        Message::new("assistant", "4."),
        Message::new("user", "And 3+3?"),
        Message::new("assistant", "6."),
    ];
    msgs[2].extra.insert("thinking".into(), Value::from("Two and two make four."));
    msgs[4].extra.insert("thinking".into(), Value::from("Three and three make six."));
    msgs
}

#[test]
fn the_harmony_template_renders_as_transformers_and_trains_the_last_turns_analysis_and_final() {
    use tunekit::tokenize::mask::{LossMode, Tokenizing};
    std::env::set_var("SOURCE_DATE_EPOCH", "1721995200");
    let tpl = ChatTemplate::builtin_or_file("harmony", Map::new()).unwrap();
    let msgs = harmony_conversation();
    let text = tpl.render(&msgs, None, false).unwrap();
    // transformers renders the same text (its renderer, the date fixed as tunekit's).
    if let Some(py) = common::python_with("transformers, jinja2") {
        let script = r#"
import datetime, json, sys
import transformers.utils.chat_template_utils as ctu
class Fixed(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return datetime.datetime(2024, 7, 26, 12, 0, 0)
ctu.datetime = Fixed
src, msgs = json.load(sys.stdin)
print(ctu.render_jinja_template(conversations=[msgs], chat_template=src, add_generation_prompt=False)[0][0], end="")
"#;
        let source = std::fs::read_to_string(common::root().join("templates/chat/harmony.jinja")).unwrap();
        let input = serde_json::to_vec(&(source, &msgs)).unwrap();
        let mut child = std::process::Command::new(py)
            .args(["-c", script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), &input).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            text,
            "harmony: tunekit and transformers render differently"
        );
    }
    // The earlier turn is rendered with its final channel only (ending <|end|>), the last with its
    // analysis channel and its final one ending <|return|>; the spans train what the model writes.
    let tok = tunekit::tokenize::TokenizerInfo::load(&common::root().join("datasets/tokenizers/qwen3")).unwrap();
    let conv = tunekit::record::Conversation { messages: msgs, ..serde_json::from_str(r#"{"messages": []}"#).unwrap() };
    let t = Tokenizing { tok: &tok, template: &tpl, mode: LossMode::Assistant };
    let (full, spans) = t.render_spans(&conv).unwrap();
    assert_eq!(full, text);
    let trained: Vec<&str> = spans.iter().map(|&(a, b)| &full[a..b]).collect();
    assert_eq!(
        trained,
        [
            "<|channel|>final<|message|>4.",
            "<|channel|>analysis<|message|>Three and three make six.<|end|><|start|>assistant<|channel|>final<|message|>6.<|return|>"
        ]
    );
    assert!(!full.contains("Two and two"), "the earlier turn's analysis is dropped, as gpt-oss's template does");
}
