//! Every model family against transformers + PEFT: tests/fixtures/families/make_family.py builds a
//! tiny random checkpoint of the family with transformers (its sequences longer than the sliding
//! windows), a PEFT adapter with non-zero B, and the reference numbers; tunekit loads both and must
//! give the same base logits and adapter logits (f32, max |diff| under 1e-4 of the largest logit,
//! about 1e-4 relative), the same packed-row loss (1e-5 relative) and the same LoRA gradients (1e-4
//! of the largest). The script needs torch, transformers and peft (.ci/fetch-tools installs them);
//! without them the tests say SKIPPED, and fail under TUNEKIT_REQUIRE_ASSETS=1 (CI).

mod common;

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;
use tunekit::pack::rows::PackedRow;
use tunekit::train::io::load_base;
use tunekit::train::model::batch::Batch;
use tunekit::train::model::Model;

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

/// The family's checkpoint and reference, made by transformers into `dir`; None where the Python
/// packages are missing (outside CI).
fn reference(family: &str, dir: &Path) -> Option<HashMap<String, Tensor>> {
    let py = common::python_with("torch, transformers, peft")?;
    let script = common::root().join("tests/fixtures/families/make_family.py");
    let out = std::process::Command::new(py).arg(script).arg(family).arg(dir).output().unwrap();
    assert!(out.status.success(), "make_family.py {family}: {}", String::from_utf8_lossy(&out.stderr));
    Some(candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap())
}

fn check(family: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let Some(r) = reference(family, dir) else { return };
    let v = |k: &str| -> Vec<i32> {
        r[k].to_dtype(DType::I64).unwrap().to_vec1::<i64>().unwrap().into_iter().map(|x| x as i32).collect()
    };
    let row = PackedRow {
        input_ids: v("input_ids"),
        labels: v("labels"),
        position_ids: v("position_ids"),
        seq_lengths: v("seq_lengths"),
    };
    let dev = Device::Cpu;
    let base = load_base(dir, &dev, None).unwrap();
    let mut model = Model::from_base(&base, &dev).unwrap();
    let batch = Batch::from_rows(&[&row], &dev).unwrap();
    let lens: Vec<usize> = row.seq_lengths.iter().map(|&l| l as usize).collect();

    let logits = model.logits(&batch.input_ids, &batch.position_ids, &lens).unwrap();
    let (d, scale) = (max_diff(&logits, &r["base_logits"]), max_abs(&r["base_logits"]));
    assert!(d < 1e-4 * scale.max(1.0), "{family}: base logits differ from transformers by {d} (largest {scale})");

    tunekit::train::io::peft::load_into(&mut model, &dir.join("adapter")).unwrap();
    let logits = model.logits(&batch.input_ids, &batch.position_ids, &lens).unwrap();
    let (d, scale) = (max_diff(&logits, &r["peft_logits"]), max_abs(&r["peft_logits"]));
    assert!(d < 1e-4 * scale.max(1.0), "{family}: logits with the adapter differ from PEFT by {d} (largest {scale})");

    let loss = (model.loss_sum(&batch, None, 4).unwrap() / batch.trained as f64).unwrap();
    let (got, want) = (loss.to_scalar::<f32>().unwrap(), r["loss"].to_vec1::<f32>().unwrap()[0]);
    assert!((got - want).abs() < 1e-5 * want.abs().max(1.0), "{family}: packed loss {got} vs transformers {want}");

    let grads = loss.backward().unwrap();
    let named = model.lora_vars();
    let expected = r.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(named.len(), expected, "{family}: as many adapter matrices as PEFT's");
    for (n, var) in &named {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{family}: no gradient for {n}"));
        let want = r.get(&format!("grad.{n}")).unwrap_or_else(|| panic!("{family}: PEFT has no {n}"));
        let (d, scale) = (max_diff(g, want), max_abs(want).max(1e-6));
        assert!(d < 1e-4 * scale, "{family}: gradient of {n} differs from torch by {d} (largest {scale})");
    }
    eprintln!("{family}: logits, adapter logits, loss {got} and {} gradients match transformers + PEFT", named.len());
}

#[test]
fn gemma3_sliding_windows_local_rope_qk_norms_geglu() {
    check("gemma3");
}

#[test]
fn gemma2_soft_capped_scores_and_logits() {
    check("gemma2");
}

#[test]
fn phi3_fused_projections_partial_longrope() {
    check("phi3");
}

#[test]
fn smollm3_no_rope_every_fourth_layer() {
    check("smollm3");
}

#[test]
fn olmo2_post_norms_whole_qk_norms() {
    check("olmo2");
}

#[test]
fn granite_multipliers() {
    check("granite");
}

#[test]
fn mistral_sliding_window() {
    check("mistral");
}

#[test]
fn llama_and_qwen3_stay_exact() {
    check("llama");
    check("qwen3");
}
