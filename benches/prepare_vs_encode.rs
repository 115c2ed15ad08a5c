//! The physical limit of `prepare`: the tokenizers crate encoding the same rendered texts, on the
//! same rayon pool, versus the whole prepare job (read, map, dedup off, render with masks, encode,
//! pack, write Parquet). Run: `cargo bench --bench prepare_vs_encode -- FILE TOKENIZER_DIR`.

use rayon::prelude::*;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::time::Instant;
use tunekit::commands::prepare::PrepareOptions;
use tunekit::ingest::{stream_conversations, Item, MapOptions};
use tunekit::tokenize::chat_template;
use tunekit::tokenize::TokenizerInfo;

fn main() {
    let args: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    let home = std::env::var("HOME").unwrap_or_default();
    let file = args.get(1).cloned().unwrap_or(format!("{home}/.cache/tunekit-bench/alpaca_20k.json"));
    let tok_dir =
        args.get(2).cloned().unwrap_or_else(|| format!("{}/datasets/tokenizers/qwen3", env!("CARGO_MANIFEST_DIR")));
    let tok = TokenizerInfo::load(&PathBuf::from(&tok_dir)).expect("tokenizer");
    let tpl = chat_template(&tok, None).expect("template");

    // Render every conversation once (not timed).
    let mut convs = Vec::new();
    stream_conversations(&[PathBuf::from(&file)], &MapOptions::default(), |b| {
        convs.extend(b.items.into_iter().filter_map(|i| if let Item::Ok(c) = i { Some(c) } else { None }));
        Ok(())
    })
    .expect("read");
    let texts: Vec<String> = convs.par_iter().map(|c| tpl.render(&c.messages, None, false).expect("render")).collect();

    let mut encode_best = f64::MAX;
    let mut prepare_best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let n: usize = texts.par_iter().map(|s| tok.tokenizer.encode(s.as_str(), false).expect("encode").len()).sum();
        encode_best = encode_best.min(t.elapsed().as_secs_f64());
        assert!(n > 0);

        let out = std::env::temp_dir().join("tunekit-bench-prepare");
        let mut o = PrepareOptions::new(vec![PathBuf::from(&file)], out, PathBuf::from(&tok_dir));
        o.dedup.mode = tunekit::dedup::DedupMode::None;
        tunekit::progress::set_quiet(true);
        let t = Instant::now();
        tunekit::commands::prepare::run(&o).expect("prepare");
        prepare_best = prepare_best.min(t.elapsed().as_secs_f64());
    }
    let t = Instant::now();
    let _ = TokenizerInfo::load(&PathBuf::from(&tok_dir)).expect("tokenizer");
    let load_s = t.elapsed().as_secs_f64();
    let tk = tunekit::tokenize::Tokenizing { tok: &tok, template: &tpl, mode: tunekit::tokenize::LossMode::Assistant };
    let t = Instant::now();
    let spans: usize = convs.par_iter().map(|c| tk.render_spans(c).expect("render").1.len()).sum();
    let render_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let samples: usize = convs.par_iter().map(|c| tk.sample(c).expect("sample").len()).sum();
    let sample_s = t.elapsed().as_secs_f64();
    println!("tokenizer_load_s={load_s:.3} render_with_spans_s={render_s:.3} ({spans} spans) render+encode+mask_s={sample_s:.3} ({samples} tokens)");
    let rows = convs.len() as f64;
    println!(
        "rows={} encode_only_s={encode_best:.3} ({:.0} rows/s) prepare_s={prepare_best:.3} ({:.0} rows/s) ratio={:.2}",
        convs.len(),
        rows / encode_best,
        rows / prepare_best,
        prepare_best / encode_best
    );
}
