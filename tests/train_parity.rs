//! Trainer parity with transformers + PEFT + torch (fixtures from tests/fixtures/train/make_fixtures.py):
//! base logits, PEFT logits, the packed-row loss, and one AdamW step, for Llama (GQA, tied
//! embeddings, Llama-3 rope scaling), Qwen2 (q/k/v bias) and Qwen3 (q/k norm).

mod common;

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use tunekit::pack::rows::PackedRow;
use tunekit::train::io::load_base;
use tunekit::train::model::batch::Batch;
use tunekit::train::model::Model;
use tunekit::train::optim::{AdamW, AdamWConfig, Optim};

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn fixture(arch: &str) -> (std::path::PathBuf, HashMap<String, Tensor>, PackedRow) {
    let dir = common::root().join("tests/fixtures/train").join(arch);
    let r = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let v = |k: &str| -> Vec<i32> {
        r[k].to_dtype(DType::I64).unwrap().to_vec1::<i64>().unwrap().into_iter().map(|x| x as i32).collect()
    };
    let row = PackedRow {
        input_ids: v("input_ids"),
        labels: v("labels"),
        position_ids: v("position_ids"),
        seq_lengths: v("seq_lengths"),
    };
    (dir, r, row)
}

fn check(arch: &str) {
    let (dir, r, row) = fixture(arch);
    let dev = Device::Cpu;
    let base = load_base(&dir, &dev, None).unwrap();
    let mut model = Model::from_base(&base, &dev).unwrap();
    let batch = Batch::from_rows(&[&row], &dev).unwrap();
    let lens: Vec<usize> = row.seq_lengths.iter().map(|&l| l as usize).collect();

    let logits = model.logits(&batch.input_ids, &batch.position_ids, &lens).unwrap();
    let d = max_diff(&logits, &r["base_logits"]);
    assert!(d < 1e-4, "{arch}: base logits differ from transformers by {d}");

    tunekit::train::io::peft::load_into(&mut model, &dir.join("adapter")).unwrap();
    let logits = model.logits(&batch.input_ids, &batch.position_ids, &lens).unwrap();
    let d = max_diff(&logits, &r["peft_logits"]);
    assert!(d < 1e-4, "{arch}: logits with the adapter differ from PEFT by {d}");

    let loss = (model.loss_sum(&batch, None, 4).unwrap() / batch.trained as f64).unwrap();
    let want = r["loss"].to_vec1::<f32>().unwrap()[0];
    let got = loss.to_scalar::<f32>().unwrap();
    assert!((got - want).abs() < 1e-5 * want.abs().max(1.0), "{arch}: packed loss {got} vs transformers {want}");

    let named = model.lora_vars();
    let vars: Vec<_> = named.iter().map(|(_, v)| v.clone()).collect();
    let grads = loss.backward().unwrap();
    let g: Vec<Tensor> = named
        .iter()
        .map(|(n, v)| {
            let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{arch}: no gradient for {n}")).clone();
            assert!(
                g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0,
                "{arch}: zero gradient for {n}"
            );
            g
        })
        .collect();
    for ((n, _), g) in named.iter().zip(&g) {
        let want = &r[&format!("grad.{n}")];
        let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-6);
        let d = max_diff(g, want);
        assert!(d < 1e-4 * scale, "{arch}: gradient of {n} differs from torch by {d} (max {scale})");
    }
    let embed_before = model.embed.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut opt = AdamW::new(AdamWConfig { lr: 1e-2, weight_decay: 0.01, ..Default::default() }, &named).unwrap();
    opt.update(&vars, &g, 1e-2).unwrap();
    // Adam's first step is lr * g / (|g| + eps): where |g| is near eps, float noise in g moves
    // the update; compare where the gradient is clearly resolved.
    for (n, v) in &named {
        let want = r.get(&format!("after_step.{n}")).unwrap_or_else(|| panic!("{arch}: fixture lacks {n}"));
        let resolved = r[&format!("grad.{n}")].abs().unwrap().ge(1e-6).unwrap().to_dtype(DType::F32).unwrap();
        let d =
            ((v.as_tensor() - want).unwrap().abs().unwrap() * resolved).unwrap().flatten_all().unwrap().max(0).unwrap();
        let d = d.to_scalar::<f32>().unwrap();
        assert!(d < 1e-5, "{arch}: {n} after one AdamW step differs from torch by {d}");
    }
    assert_eq!(model.embed.flatten_all().unwrap().to_vec1::<f32>().unwrap(), embed_before, "base weights never change");
}

/// LoRA+ (`--loraplus-lr-ratio 16`) against PEFT's `create_loraplus_optimizer` over torch's AdamW
/// (tests/fixtures/train/loraplus_steps.py): the same losses over three steps and the same adapter
/// after them, B having moved at 16 times A's learning rate.
#[test]
fn loraplus_steps_are_pefts() {
    let Some(py) = common::python_with("peft") else { return };
    let (dir, _, row) = fixture("qwen2");
    let out = tempfile::tempdir().unwrap();
    let want_file = out.path().join("loraplus.safetensors");
    let script = common::root().join("tests/fixtures/train/loraplus_steps.py");
    let o = std::process::Command::new(&py)
        .args([script.to_str().unwrap(), dir.to_str().unwrap(), want_file.to_str().unwrap(), "16", "3"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = candle_core::safetensors::load(&want_file, &Device::Cpu).unwrap();
    let dev = Device::Cpu;
    let mut model = Model::from_base(&load_base(&dir, &dev, None).unwrap(), &dev).unwrap();
    tunekit::train::io::peft::load_into(&mut model, &dir.join("adapter")).unwrap();
    let batch = Batch::from_rows(&[&row], &dev).unwrap();
    let named = model.lora_vars();
    let vars: Vec<_> = named.iter().map(|(_, v)| v.clone()).collect();
    let cfg = AdamWConfig { lr: 1e-2, weight_decay: 0.01, loraplus_lr_ratio: Some(16.0), ..Default::default() };
    let mut opt = AdamW::new(cfg, &named).unwrap();
    let start: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().copy().unwrap()).collect();
    let losses = want["losses"].to_vec1::<f32>().unwrap();
    let mut first: HashMap<String, Tensor> = HashMap::new();
    for want_loss in losses {
        let loss = (model.loss_sum(&batch, None, 4).unwrap() / batch.trained as f64).unwrap();
        let got = loss.to_scalar::<f32>().unwrap();
        assert!((got - want_loss).abs() < 1e-5 * want_loss.abs().max(1.0), "loss {got} vs PEFT's {want_loss}");
        let grads = loss.backward().unwrap();
        let g: Vec<Tensor> = vars.iter().map(|v| grads.get(v.as_tensor()).unwrap().clone()).collect();
        if first.is_empty() {
            first = named.iter().zip(&g).map(|((n, _), g)| (n.clone(), g.clone())).collect();
        }
        opt.update(&vars, &g, 1e-2).unwrap();
    }
    let mut moved = (0f32, 0f32);
    for ((n, v), before) in named.iter().zip(&start) {
        let w = want.get(n).unwrap_or_else(|| panic!("PEFT's run lacks {n}"));
        // Where the first gradient is near Adam's eps, float noise in it moves the update: compare
        // where it is resolved.
        let resolved = first[n].abs().unwrap().ge(1e-6).unwrap().to_dtype(DType::F32).unwrap();
        let d = ((v.as_tensor() - w).unwrap().abs().unwrap() * resolved).unwrap();
        let d = d.flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-4, "{n} after three LoRA+ steps differs from PEFT's by {d}");
        let m = max_diff(v.as_tensor(), before);
        if n.contains("lora_B") {
            moved.1 = moved.1.max(m)
        } else {
            moved.0 = moved.0.max(m)
        }
    }
    // Adam moves each weight by about lr per step: B's by 16 times A's.
    assert!(moved.1 > 8.0 * moved.0, "B moved {} and A {}: B's learning rate is not 16x", moved.1, moved.0);
}

/// Full fine-tuning against PyTorch (tests/fixtures/train/full_steps.py: every weight trained by
/// torch's AdamW, matrices decayed and 1-D weights not): the first step's gradient of every weight
/// (plain backward and gradient checkpointing alike), the five losses to 1e-5 relative, and every
/// weight after five steps.
fn full_steps_are_torchs(arch: &str) {
    let Some(py) = common::python_with("transformers") else { return };
    let (want, named, _) = full_steps(&py, arch, Optim::AdamW, "adamw");
    for (n, v) in &named {
        let w = want.get(n).unwrap_or_else(|| panic!("{arch}: torch's run lacks {n}"));
        let resolved = want[&format!("grad.{n}")].abs().unwrap().ge(1e-6).unwrap().to_dtype(DType::F32).unwrap();
        let d = ((v.as_tensor() - w).unwrap().abs().unwrap() * resolved).unwrap();
        let d = d.flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-4, "{arch}: {n} after five full fine-tuning steps differs from torch's by {d}");
    }
}

/// Runs tests/fixtures/train/full_steps.py with `optim` (torch's AdamW, or bitsandbytes' AdamW8bit
/// on its CPU backend) and the same five steps in tunekit, checking the losses and the first
/// step's gradients as it goes: torch's results, tunekit's variables after the steps, and
/// tunekit's optimizer.
fn full_steps(
    py: &str,
    arch: &str,
    optim: Optim,
    script_optim: &str,
) -> (HashMap<String, Tensor>, Vec<(String, candle_core::Var)>, AdamW) {
    let (dir, _, row) = fixture(arch);
    let out = tempfile::tempdir().unwrap();
    let want_file = out.path().join("full.safetensors");
    let script = common::root().join("tests/fixtures/train/full_steps.py");
    let o = std::process::Command::new(py)
        .args([
            script.to_str().unwrap(),
            dir.to_str().unwrap(),
            want_file.to_str().unwrap(),
            "5",
            "1e-3",
            "0.01",
            script_optim,
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = candle_core::safetensors::load(&want_file, &Device::Cpu).unwrap();
    let dev = Device::Cpu;
    let mut model = Model::from_base(&load_base(&dir, &dev, None).unwrap(), &dev).unwrap();
    model.train_in_full().unwrap();
    let batch = Batch::from_rows(&[&row], &dev).unwrap();
    let named = model.trained_vars();
    let torch_names: Vec<&String> =
        want.keys().filter(|k| k.starts_with("model.") || k.starts_with("lm_head.")).collect();
    assert_eq!(
        named.len(),
        torch_names.len(),
        "{arch}: tunekit trains {} tensors, torch {}",
        named.len(),
        torch_names.len()
    );
    let vars: Vec<_> = named.iter().map(|(_, v)| v.clone()).collect();
    let cfg = AdamWConfig { lr: 1e-3, weight_decay: 0.01, optim, ..Default::default() };
    let mut opt = AdamW::new(cfg, &named).unwrap();
    let losses = want["losses"].to_vec1::<f32>().unwrap();
    for (step, want_loss) in losses.into_iter().enumerate() {
        let loss = (model.loss_sum(&batch, None, 4).unwrap() / batch.trained as f64).unwrap();
        let got = loss.to_scalar::<f32>().unwrap();
        // f32 AdamW to 1e-5; 8-bit states to 4 significant digits (the quantisers differ, below).
        let tol = if optim == Optim::AdamW8bit { 1e-4 } else { 1e-5 };
        assert!(
            (got - want_loss).abs() < tol * want_loss.abs().max(1.0),
            "{arch} step {step}: loss {got} vs torch's {want_loss}"
        );
        let grads = loss.backward().unwrap();
        let g: Vec<Tensor> = named
            .iter()
            .map(|(n, v)| grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{arch}: no gradient for {n}")).clone())
            .collect();
        if step == 0 {
            let (_, checkpointed) =
                model.loss_and_grads_checkpointed(&batch, None, 4, 1.0 / batch.trained as f64, 0.0).unwrap();
            for (((n, _), g), c) in named.iter().zip(&g).zip(&checkpointed) {
                let w = &want[&format!("grad.{n}")];
                let scale =
                    w.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-6);
                let d = max_diff(g, w);
                assert!(d < 1e-4 * scale, "{arch}: gradient of {n} differs from torch's by {d} (max {scale})");
                let d = max_diff(c, w);
                assert!(d < 1e-4 * scale, "{arch}: checkpointed gradient of {n} differs from torch's by {d}");
            }
        }
        opt.update(&vars, &g, 1e-3).unwrap();
    }
    (want, named, opt)
}

/// `--optim adamw_8bit` over five steps: equal to the 8-bit scheme written out in the test script
/// (bitsandbytes' maps, identical to the bit, and blocks of 256, the nearest code; all but 0.1% of
/// the weights within 1e-6, the rest within a learning rate), and beside bitsandbytes' own AdamW8bit (CPU backend) the same losses to 4
/// significant digits and weights within 4 learning rates: bitsandbytes' CPU quantiser finds codes
/// by an approximate bucket search that rounds a few values to a neighbouring code, and those
/// weights drift apart by as much as bitsandbytes' own weights drift from f32 AdamW's. The states
/// take under a third of the f32 states' bytes.
#[test]
fn full_fine_tuning_with_8_bit_adamw_is_bitsandbytes() {
    let Some(py) = common::python_with("bitsandbytes") else { return };
    let (reference, named, opt) = full_steps(&py, "llama", Optim::AdamW8bit, "adamw_8bit_reference");
    for (signed, key) in [(true, "map.signed"), (false, "map.unsigned")] {
        let theirs = reference[key].to_vec1::<f32>().unwrap();
        assert_eq!(&theirs[..], &tunekit::train::optim::blockwise8::dynamic_map(signed)[..], "{key}");
    }
    // A value at a midpoint between two codes rounds either way under float noise: those few
    // weights then differ by a fraction of the learning rate; every other weight to 1e-6.
    let (mut off, mut total, mut worst) = (0, 0, 0f32);
    for (n, v) in &named {
        let d =
            (v.as_tensor() - &reference[n]).unwrap().abs().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        off += d.iter().filter(|&&x| x > 1e-6).count();
        total += d.len();
        worst = d.iter().fold(worst, |a, &b| a.max(b));
    }
    eprintln!("8-bit AdamW: {off} of {total} weights beyond 1e-6 of the reference, all within {worst:.2e}");
    assert!(
        off * 1000 < total && worst < 1e-3,
        "{off} of {total} weights beyond 1e-6 of the reference, the worst {worst}"
    );
    let (bnb, named, _) = full_steps(&py, "llama", Optim::AdamW8bit, "adamw_8bit");
    let (f32_run, _, f32_opt) = full_steps(&py, "llama", Optim::AdamW, "adamw");
    let (mut from_bnb, mut bnb_from_f32) = (0f32, 0f32);
    for (n, v) in &named {
        from_bnb = from_bnb.max(max_diff(v.as_tensor(), &bnb[n]));
        bnb_from_f32 = bnb_from_f32.max(max_diff(&bnb[n], &f32_run[n]));
    }
    eprintln!(
        "8-bit AdamW: weights within {from_bnb:.2e} of bitsandbytes' (which is within {bnb_from_f32:.2e} of f32 AdamW)"
    );
    assert!(from_bnb < 4e-3, "8-bit AdamW's weights moved {from_bnb} from bitsandbytes'");
    let (q8, f32) = (opt.state_bytes() as f64, f32_opt.state_bytes() as f64);
    assert!(q8 < 0.35 * f32, "8-bit states {q8} bytes, f32 states {f32}");
}

#[test]
fn full_fine_tuning_llama_tied_is_torchs() {
    full_steps_are_torchs("llama");
}

#[test]
fn full_fine_tuning_qwen2_bias_untied_is_torchs() {
    full_steps_are_torchs("qwen2");
}

#[test]
fn full_fine_tuning_qwen3_qk_norm_is_torchs() {
    full_steps_are_torchs("qwen3");
}

/// DoRA against PEFT's `use_dora` (tests/fixtures/train/dora_steps.py) on Qwen2 (biases): a PEFT
/// DoRA adapter with random A, B and magnitudes loads into tunekit with the same packed loss (1e-5)
/// and every gradient, the magnitudes' included, within 1e-4 of the largest; after three tunekit
/// AdamW steps the adapter tunekit writes loads into PEFT with the same loss to 5 digits, and the
/// merged weights give the adapter's logits.
#[test]
fn dora_is_pefts() {
    let Some(py) = common::python_with("peft") else { return };
    let (dir, _, row) = fixture("qwen2");
    let out = tempfile::tempdir().unwrap();
    let script = common::root().join("tests/fixtures/train/dora_steps.py");
    let run = |mode: &str, path: &std::path::Path| {
        let o = std::process::Command::new(&py)
            .args([script.to_str().unwrap(), dir.to_str().unwrap(), mode, path.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    run("init", out.path());
    let want = candle_core::safetensors::load(out.path().join("grads.safetensors"), &Device::Cpu).unwrap();
    let dev = Device::Cpu;
    let mut model = Model::from_base(&load_base(&dir, &dev, None).unwrap(), &dev).unwrap();
    let s = tunekit::train::io::peft::load_into(&mut model, &out.path().join("adapter")).unwrap();
    assert!(s.use_dora);
    let batch = Batch::from_rows(&[&row], &dev).unwrap();
    let loss = (model.loss_sum(&batch, None, 4).unwrap() / batch.trained as f64).unwrap();
    let (got, peft_loss) = (loss.to_scalar::<f32>().unwrap(), want["loss"].to_vec1::<f32>().unwrap()[0]);
    assert!((got - peft_loss).abs() < 1e-5 * peft_loss.abs().max(1.0), "DoRA loss {got} vs PEFT's {peft_loss}");
    let named = model.lora_vars();
    assert_eq!(named.iter().filter(|(n, _)| n.ends_with("lora_magnitude_vector")).count(), 14);
    let grads = loss.backward().unwrap();
    for (n, v) in &named {
        let w = want.get(&format!("grad.{n}")).unwrap_or_else(|| panic!("PEFT has no gradient for {n}"));
        let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {n}"));
        let scale = w.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-6);
        let d = max_diff(g, w);
        assert!(d < 1e-4 * scale, "gradient of {n} differs from PEFT's by {d} (max {scale})");
    }
    let vars: Vec<_> = named.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(AdamWConfig { lr: 1e-2, ..Default::default() }, &named).unwrap();
    for _ in 0..3 {
        let loss = (model.loss_sum(&batch, None, 4).unwrap() / batch.trained as f64).unwrap();
        let grads = loss.backward().unwrap();
        let g: Vec<Tensor> = vars.iter().map(|v| grads.get(v.as_tensor()).unwrap().clone()).collect();
        opt.update(&vars, &g, 1e-2).unwrap();
    }
    let loss = (model.loss_sum(&batch, None, 4).unwrap() / batch.trained as f64).unwrap().to_scalar::<f32>().unwrap();
    let saved = out.path().join("trained");
    tunekit::train::io::peft::save(&model, &s, "qwen2", &saved).unwrap();
    let peft: f32 = run("loss", &saved).parse().unwrap();
    assert!((loss - peft).abs() < 1e-5 * peft.abs().max(1.0), "trained DoRA: tunekit {loss}, PEFT {peft}");
    assert!((loss - got).abs() > 1e-3, "three steps moved the loss: {got} -> {loss}");
    // Merged: each row W + s B A rescaled to its magnitude gives the adapter's logits.
    let merged_dir = out.path().join("merged");
    tunekit::train::io::merge::write_hf(&model, &merged_dir).unwrap();
    let merged = Model::from_base(&load_base(&merged_dir, &dev, None).unwrap(), &dev).unwrap();
    let lens: Vec<usize> = row.seq_lengths.iter().map(|&l| l as usize).collect();
    let a = model.logits(&batch.input_ids, &batch.position_ids, &lens).unwrap();
    let b = merged.logits(&batch.input_ids, &batch.position_ids, &lens).unwrap();
    assert!(max_diff(&a, &b) < 1e-4, "merged DoRA differs by {}", max_diff(&a, &b));
}

/// s' B' A' of every module of a PEFT adapter file (rank and alpha from its config): the weight
/// change it makes, whatever the signs of its factors.
fn adapter_deltas(dir: &std::path::Path) -> HashMap<String, Tensor> {
    let (s, t) = tunekit::train::io::peft::read(dir).unwrap();
    t.iter()
        .filter_map(|(k, a)| {
            let module = tunekit::train::adapters::lora::module_of_lora_a(k)?;
            let b = &t[&k.replace("lora_A", "lora_B")];
            Some((module.to_string(), (b.matmul(a).unwrap() * s.scale()).unwrap()))
        })
        .collect()
}

/// PiSSA / OLoRA (`--lora-init`) against PEFT's `init_lora_weights` on the Qwen2 fixture
/// (tests/fixtures/train/lora_init_steps.py): the residual base weights and the initial s B0 A0 of
/// every projection, the losses of three AdamW steps (to 5 digits: the factors' signs may differ
/// from LAPACK's, and AdamW is sign-equivariant), the adapter converted to rank 2r as PEFT's
/// `path_initial_model_for_weight_conversion` (the same weight change per module; each tool
/// loads the other's with the trained loss), and the adapter switched off giving the base.
fn lora_init_is_pefts(init: &str) {
    use tunekit::train::adapters::lora::{LoraSettings, ALL_LINEAR};
    use tunekit::train::adapters::lora_init::LoraInit;
    let Some(py) = common::python_with("peft") else { return };
    let (dir, r, row) = fixture("qwen2");
    let out = tempfile::tempdir().unwrap();
    let script = common::root().join("tests/fixtures/train/lora_init_steps.py");
    let run = |args: &[&str]| {
        let o = std::process::Command::new(&py)
            .args([script.to_str().unwrap(), dir.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    run(&["train", init, out.path().to_str().unwrap()]);
    let want = candle_core::safetensors::load(out.path().join("steps.safetensors"), &Device::Cpu).unwrap();
    let dev = Device::Cpu;
    let mut model = Model::from_base(&load_base(&dir, &dev, None).unwrap(), &dev).unwrap();
    let s = LoraSettings {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        rslora: false,
        targets: ALL_LINEAR.iter().map(|t| t.to_string()).collect(),
        doubled_gate_up: false,
        train_router: false,
        use_dora: false,
        init: LoraInit::parse(init).unwrap(),
    };
    model.add_lora(&s, 0).unwrap();
    let (mut modules, mut worst) = (0, [0f32; 3]);
    for lin in model.layers.iter().flat_map(|l| l.linears()).filter(|l| l.lora.is_some()) {
        let l = lin.lora.as_ref().unwrap();
        let start = (l.b.as_tensor().matmul(l.a.as_tensor()).unwrap() * l.scale).unwrap();
        for (what, got) in [("residual", lin.dense_weight().unwrap()), ("start", start)] {
            let w = &want[&format!("{what}.{}", lin.name)];
            let scale = w.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            let d = max_diff(&got, w);
            assert!(d < 1e-5 * scale.max(1.0), "{init}: {what} of {} differs from PEFT's by {d}", lin.name);
            worst[0] = worst[0].max(d);
        }
        modules += 1;
    }
    assert_eq!(modules, 14, "two layers of seven projections");
    let batch = Batch::from_rows(&[&row], &dev).unwrap();
    let lens: Vec<usize> = row.seq_lengths.iter().map(|&l| l as usize).collect();
    // Switched off, the adapter leaves the base (DPO's reference): residual + s B0 A0.
    model.set_lora_enabled(false);
    let off = model.logits(&batch.input_ids, &batch.position_ids, &lens).unwrap();
    assert!(max_diff(&off, &r["base_logits"]) < 1e-4, "{init}: the adapter off is not the base");
    model.set_lora_enabled(true);
    let losses = want["losses"].to_vec1::<f32>().unwrap();
    let named = model.lora_vars();
    let vars: Vec<_> = named.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(AdamWConfig { lr: 1e-2, ..Default::default() }, &named).unwrap();
    let close = |a: f32, b: f32| (a - b).abs() < 1e-5 * b.abs().max(1.0);
    for (step, &peft) in losses.iter().enumerate() {
        let loss = (model.loss_sum(&batch, None, 4).unwrap() / batch.trained as f64).unwrap();
        let got = loss.to_scalar::<f32>().unwrap();
        assert!(close(got, peft), "{init}: loss before step {} is {got}, PEFT's {peft}", step + 1);
        worst[1] = worst[1].max((got - peft).abs());
        if step < 3 {
            let grads = loss.backward().unwrap();
            let g: Vec<Tensor> = vars.iter().map(|v| grads.get(v.as_tensor()).unwrap().clone()).collect();
            opt.update(&vars, &g, 1e-2).unwrap();
        }
    }
    assert!(losses[3] < losses[0] - 0.1, "{init}: three steps lowered PEFT's loss {losses:?}");
    let trained = *losses.last().unwrap();
    let saved = out.path().join("tunekit");
    tunekit::train::io::peft::save(&model, &s, "qwen2", &saved).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(saved.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg["r"].as_u64(), cfg["lora_alpha"].as_f64()), (Some(8), Some(16.0)), "{init}: {cfg}");
    assert_eq!(cfg["init_lora_weights"], serde_json::json!(true));
    let (ours, theirs) = (adapter_deltas(&saved), adapter_deltas(&out.path().join("converted")));
    assert_eq!(ours.len(), 14);
    for (module, d) in &ours {
        let w = &theirs[module];
        let scale = w.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let diff = max_diff(d, w);
        assert!(
            diff < 1e-3 * scale.max(1e-3),
            "{init}: converted {module} differs from PEFT's by {diff} (max {scale})"
        );
        worst[2] = worst[2].max(diff / scale.max(1e-3));
    }
    eprintln!(
        "{init}: residual/start {:.1e}, losses {:.1e} ({losses:?}), converted deltas {:.1e} relative",
        worst[0], worst[1], worst[2]
    );
    let peft: f32 = run(&["loss", saved.to_str().unwrap()]).parse().unwrap();
    assert!(close(peft, trained), "{init}: PEFT loads tunekit's converted adapter with loss {peft}, trained {trained}");
    let mut fresh = Model::from_base(&load_base(&dir, &dev, None).unwrap(), &dev).unwrap();
    tunekit::train::io::peft::load_into(&mut fresh, &out.path().join("converted")).unwrap();
    let got = (fresh.loss_sum(&batch, None, 4).unwrap() / batch.trained as f64).unwrap().to_scalar::<f32>().unwrap();
    assert!(
        close(got, trained),
        "{init}: PEFT's converted adapter loads in tunekit with loss {got}, trained {trained}"
    );
    // Saved unconverted, the adapter needs the base's residual: tunekit redoes the decomposition on
    // load as PEFT does; llama.cpp cannot, so its GGUF is refused.
    let unconverted = out.path().join("unconverted");
    let mut fresh = Model::from_base(&load_base(&dir, &dev, None).unwrap(), &dev).unwrap();
    tunekit::train::io::peft::load_into(&mut fresh, &unconverted).unwrap();
    let got = (fresh.loss_sum(&batch, None, 4).unwrap() / batch.trained as f64).unwrap().to_scalar::<f32>().unwrap();
    assert!(
        close(got, trained),
        "{init}: PEFT's unconverted adapter loads in tunekit with loss {got}, trained {trained}"
    );
    let gguf = out.path().join("a.gguf");
    let args = ["export", "gguf", "--adapter", unconverted.to_str().unwrap(), "--model", dir.to_str().unwrap()];
    let o = common::tunekit(&[&args[..], &["--out", gguf.to_str().unwrap()]].concat(), out.path());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("unconverted") && e.contains("tunekit merge"), "{e}");
}

#[test]
fn pissa_is_pefts() {
    lora_init_is_pefts("pissa");
}

#[test]
fn olora_is_pefts() {
    lora_init_is_pefts("olora");
}

#[test]
fn llama_gqa_tied_rope_scaling() {
    check("llama");
}

#[test]
fn qwen2_qkv_bias() {
    check("qwen2");
}

#[test]
fn qwen3_qk_norm() {
    check("qwen3");
}

/// The pair of tests/fixtures/train/make_dpo_fixture.py (with that file's reference values) and the
/// tiny Llama policy with its fixture adapter.
fn dpo_fixture() -> (std::path::PathBuf, HashMap<String, Tensor>, tunekit::pack::preference::PreferenceRow, Model) {
    let dir = common::root().join("tests/fixtures/train/llama");
    let r = candle_core::safetensors::load(dir.join("dpo_reference.safetensors"), &Device::Cpu).unwrap();
    let v = |k: &str| -> Vec<i32> {
        r[k].to_dtype(DType::I64).unwrap().to_vec1::<i64>().unwrap().into_iter().map(|x| x as i32).collect()
    };
    let pair = tunekit::pack::preference::PreferenceRow {
        chosen_input_ids: v("chosen_input_ids"),
        chosen_labels: v("chosen_labels"),
        rejected_input_ids: v("rejected_input_ids"),
        rejected_labels: v("rejected_labels"),
    };
    let base = load_base(&dir, &Device::Cpu, None).unwrap();
    let mut model = Model::from_base(&base, &Device::Cpu).unwrap();
    tunekit::train::io::peft::load_into(&mut model, &dir.join("adapter")).unwrap();
    (dir, r, pair, model)
}

/// DPO against the fixture of tests/fixtures/train/make_dpo_fixture.py (TRL's loss formulas, PEFT
/// adapter disabled for the reference): the three losses and the LoRA gradients of the sigmoid loss.
#[test]
fn dpo_losses_and_gradient_match_the_reference() {
    use tunekit::train::objectives::dpo::{Dpo, DpoLoss};
    use tunekit::train::objectives::PairObjective;
    let (_, r, pair, model) = dpo_fixture();
    for (kind, key) in [(DpoLoss::Sigmoid, "loss_sigmoid"), (DpoLoss::Hinge, "loss_hinge"), (DpoLoss::Ipo, "loss_ipo")]
    {
        let got = Dpo { beta: 0.1, loss: kind }.pair(&model, &pair).unwrap().loss.to_scalar::<f32>().unwrap();
        let want = r[key].to_vec1::<f32>().unwrap()[0];
        assert!((got - want).abs() < 1e-4 * want.abs().max(1.0), "{key}: {got} vs {want}");
    }
    let o = Dpo { beta: 0.1, loss: DpoLoss::Sigmoid }.pair(&model, &pair).unwrap();
    let grads = o.loss.backward().unwrap();
    for (n, var) in model.lora_vars() {
        let want = &r[&format!("grad.{n}")];
        let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-8);
        let d = max_diff(grads.get(var.as_tensor()).unwrap(), want);
        assert!(d < 1e-3 * scale, "{n}: DPO gradient differs by {d} (max {scale})");
    }
}

/// Every LoRA gradient in `grads` equals TRL's `{name}.grad.{module}` of the fixture `r` within 1e-4
/// of its largest value; the worst difference, relative to that largest.
fn lora_grads_match(
    model: &Model,
    grads: &candle_core::backprop::GradStore,
    r: &HashMap<String, Tensor>,
    name: &str,
) -> f32 {
    let mut worst = 0f32;
    for (n, var) in model.lora_vars() {
        let want = &r[&format!("{name}.grad.{n}")];
        let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-8);
        let d = max_diff(grads.get(var.as_tensor()).unwrap(), want);
        assert!(d < 1e-4 * scale, "{name}: gradient of {n} differs from TRL's by {d} (max {scale})");
        worst = worst.max(d / scale);
    }
    worst
}

/// ORPO and SimPO against TRL's own code (tests/fixtures/train/make_orpo_simpo_fixture.py:
/// `ORPOTrainer.concatenated_forward` + `odds_ratio_loss`, `CPOTrainer.concatenated_forward` +
/// `cpo_loss` with loss_type "simpo", TRL 1.16) on the DPO fixture's pair: the losses, the rewards
/// TRL logs, and every LoRA gradient.
#[test]
fn orpo_and_simpo_losses_and_gradients_are_trls() {
    use tunekit::train::objectives::orpo::Orpo;
    use tunekit::train::objectives::simpo::Simpo;
    use tunekit::train::objectives::PairObjective;
    let (dir, _, pair, model) = dpo_fixture();
    let r = candle_core::safetensors::load(dir.join("orpo_simpo_reference.safetensors"), &Device::Cpu).unwrap();
    let objectives: [(&str, Box<dyn PairObjective>); 3] = [
        ("orpo", Box::new(Orpo { beta: 0.1 })),
        ("simpo0", Box::new(Simpo { beta: 2.0, gamma: 0.5, cpo_alpha: 0.0 })),
        ("simpo1", Box::new(Simpo { beta: 2.0, gamma: 0.5, cpo_alpha: 1.0 })),
    ];
    let scalar = |k: String| r[&k].to_vec1::<f32>().unwrap()[0];
    for (name, objective) in objectives {
        let o = objective.pair(&model, &pair).unwrap();
        let got = o.loss.to_scalar::<f32>().unwrap();
        let want = scalar(format!("{name}.loss"));
        assert!((got - want).abs() < 1e-5 * want.abs().max(1.0), "{name}: loss {got}, TRL's {want}");
        for (side, ours) in [("chosen", o.reward_chosen), ("rejected", o.reward_rejected)] {
            let want = scalar(format!("{name}.reward_{side}")) as f64;
            assert!((ours - want).abs() < 1e-5 * want.abs().max(1.0), "{name}: {side} reward {ours}, TRL's {want}");
        }
        let worst = lora_grads_match(&model, &o.loss.backward().unwrap(), &r, name);
        eprintln!("{name}: loss {got} vs TRL {want}; gradients within {worst:.1e} of the largest");
    }
}

/// KTO against TRL's own KTOTrainer.compute_loss (tests/fixtures/train/make_kto_fixture.py, TRL 1.16) on
/// a batch of four unpaired rows (three desirable) that TRL tokenised and collated: the mismatched KL
/// sequences, the reference point, the loss with equal and unequal class weights, the rewards and
/// log-probabilities TRL logs, and every LoRA gradient.
#[test]
fn kto_loss_and_gradients_are_trls() {
    use tunekit::pack::unpaired::UnpairedRow;
    use tunekit::train::objectives::kto::{mismatched, partner, Kto};
    let (dir, _, _, model) = dpo_fixture();
    let r = candle_core::safetensors::load(dir.join("../trl/kto_reference.safetensors"), &Device::Cpu).unwrap();
    let v = |k: String| -> Vec<i32> {
        r[&k].to_dtype(DType::I64).unwrap().to_vec1::<i64>().unwrap().into_iter().map(|x| x as i32).collect()
    };
    let scalar = |k: String| r[&k].to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()[0] as f64;
    let rows: Vec<UnpairedRow> = (0..4)
        .map(|i| UnpairedRow {
            input_ids: v(format!("row{i}.input_ids")),
            labels: v(format!("row{i}.labels")),
            desirable: v(format!("row{i}.label"))[0] == 1,
        })
        .collect();
    assert_eq!(rows.iter().map(|r| r.desirable).collect::<Vec<_>>(), [true, false, true, true]);
    for (k, row) in rows.iter().enumerate() {
        let (ids, _) = mismatched(row, &rows[partner(k, 4)]);
        assert_eq!(ids, v(format!("row{k}.kl_input_ids")), "row {k}: the KL sequence differs from TRL's");
    }
    for (name, uw) in [("kto", 1.0), ("kto_w", 1.5)] {
        let kto = Kto { beta: 0.1, desirable_weight: 1.0, undesirable_weight: uw };
        let sum: f64 = (0..4).map(|k| kto.kl_term(&model, &rows[k], &rows[partner(k, 4)]).unwrap()).sum();
        let z = Kto::reference_point(sum, 4);
        let want = scalar(format!("{name}.kl"));
        assert!((z - want).abs() < 1e-5, "{name}: reference point {z}, TRL's {want}");
        let mut loss: Option<Tensor> = None;
        let (mut rc, mut rr, mut lc, mut lr) = (0.0, 0.0, 0.0, 0.0);
        for row in &rows {
            let o = kto.row(&model, row, z).unwrap();
            if row.desirable {
                (rc, lc) = (rc + o.reward / 3.0, lc + o.logp / 3.0);
            } else {
                (rr, lr) = (rr + o.reward, lr + o.logp);
            }
            let l = (o.loss / 4.0).unwrap();
            loss = Some(match loss {
                None => l,
                Some(a) => (a + l).unwrap(),
            });
        }
        let loss = loss.unwrap();
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        let want = scalar(format!("{name}.loss"));
        assert!((got - want).abs() < 1e-5 * want.abs().max(1.0), "{name}: loss {got}, TRL's {want}");
        for (metric, ours) in
            [("rewards/chosen", rc), ("rewards/rejected", rr), ("logps/chosen", lc), ("logps/rejected", lr)]
        {
            let want = scalar(format!("{name}.{metric}"));
            assert!((ours - want).abs() < 1e-4 * want.abs().max(1.0), "{name}: {metric} {ours}, TRL's {want}");
        }
        let worst = lora_grads_match(&model, &loss.backward().unwrap(), &r, name);
        eprintln!("{name}: loss {got} vs TRL {want}, reference point {z}; gradients within {worst:.1e} of the largest");
    }
}

/// The GPU's precision path (bf16 base and activations, f32 norms/softmax/loss and f32 adapters),
/// run here on the CPU: the loss stays within bf16's error of transformers' f32 loss and every
/// adapter gradient points the same way as the f32 one.
#[test]
fn bf16_compute_tracks_f32() {
    let (dir, r, row) = fixture("llama");
    let dev = Device::Cpu;
    let base = load_base(&dir, &dev, None).unwrap();
    let mut f32m = Model::from_base(&base, &dev).unwrap();
    let mut bf16m = Model::from_base_as(&base, &dev, DType::BF16).unwrap();
    assert_eq!(bf16m.embed.dtype(), DType::BF16);
    tunekit::train::io::peft::load_into(&mut f32m, &dir.join("adapter")).unwrap();
    tunekit::train::io::peft::load_into(&mut bf16m, &dir.join("adapter")).unwrap();
    let batch = Batch::from_rows(&[&row], &dev).unwrap();
    let want = r["loss"].to_vec1::<f32>().unwrap()[0];
    let l16 = (bf16m.loss_sum(&batch, None, 4).unwrap() / batch.trained as f64).unwrap();
    assert_eq!(l16.dtype(), DType::F32);
    let got = l16.to_scalar::<f32>().unwrap();
    assert!((got - want).abs() < 0.02 * want.abs(), "bf16 loss {got} vs transformers f32 {want}");
    let l32 = (f32m.loss_sum(&batch, None, 4).unwrap() / batch.trained as f64).unwrap();
    let (g16, g32) = (l16.backward().unwrap(), l32.backward().unwrap());
    for ((n, v16), (_, v32)) in bf16m.lora_vars().iter().zip(f32m.lora_vars().iter()) {
        assert_eq!(v16.dtype(), DType::F32, "{n}: adapters stay f32");
        let a = g16.get(v16.as_tensor()).unwrap_or_else(|| panic!("no bf16 gradient for {n}"));
        let b = g32.get(v32.as_tensor()).unwrap();
        assert_eq!(a.dtype(), DType::F32);
        let dot = (a * b).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        let na = a.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        let nb = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
        assert!(dot / (na * nb) > 0.98, "{n}: bf16 gradient's cosine with f32's is {}", dot / (na * nb));
    }
}

/// Against TRL itself (tests/fixtures/train/make_trl_fixture.py): DPOTrainer.compute_loss on one pair
/// built by TRL's own tokenisation and collator, for the sigmoid, hinge and ipo losses, and the LoRA
/// gradients of the sigmoid loss; RewardTrainer.compute_loss of a reward model (LoRA on all linear
/// layers + the score head as modules_to_save) and the gradients of the adapter and the head.
#[test]
fn dpo_and_reward_losses_match_trl() {
    use tunekit::train::objectives::dpo::{Dpo, DpoLoss};
    use tunekit::train::objectives::reward::BradleyTerry;
    use tunekit::train::objectives::PairObjective;
    let dir = common::root().join("tests/fixtures/train");
    let r = candle_core::safetensors::load(dir.join("trl/reference.safetensors"), &Device::Cpu).unwrap();
    let v = |k: &str| -> Vec<i32> {
        r[k].to_dtype(DType::I64).unwrap().to_vec1::<i64>().unwrap().into_iter().map(|x| x as i32).collect()
    };
    let scalar = |k: &str| r[k].to_vec1::<f32>().unwrap()[0];
    let base = load_base(&dir.join("llama"), &Device::Cpu, None).unwrap();

    let pair = tunekit::pack::preference::PreferenceRow {
        chosen_input_ids: v("chosen_input_ids"),
        chosen_labels: v("chosen_labels"),
        rejected_input_ids: v("rejected_input_ids"),
        rejected_labels: v("rejected_labels"),
    };
    let mut policy = Model::from_base(&base, &Device::Cpu).unwrap();
    tunekit::train::io::peft::load_into(&mut policy, &dir.join("llama/adapter")).unwrap();
    for (kind, key) in
        [(DpoLoss::Sigmoid, "dpo_loss_sigmoid"), (DpoLoss::Hinge, "dpo_loss_hinge"), (DpoLoss::Ipo, "dpo_loss_ipo")]
    {
        let got = Dpo { beta: 0.1, loss: kind }.pair(&policy, &pair).unwrap().loss.to_scalar::<f32>().unwrap();
        assert!((got - scalar(key)).abs() < 1e-5 * scalar(key).abs().max(1.0), "{key}: {got} vs TRL {}", scalar(key));
    }
    let grads = Dpo { beta: 0.1, loss: DpoLoss::Sigmoid }.pair(&policy, &pair).unwrap().loss.backward().unwrap();
    for (n, var) in policy.lora_vars() {
        let want = &r[&format!("dpo_grad.{n}")];
        let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-8);
        let d = max_diff(grads.get(var.as_tensor()).unwrap(), want);
        assert!(d < 1e-3 * scale, "{n}: DPO gradient differs from TRL's by {d} (max {scale})");
    }

    let mut rm = Model::from_base(&base, &Device::Cpu).unwrap();
    tunekit::train::io::peft::load_into(&mut rm, &dir.join("trl/reward_adapter")).unwrap();
    assert_eq!(rm.lora_vars().len(), 2 * 7 * 2, "every projection of both layers has an adapter");
    let ids = |k: &str| v(k);
    let pair = tunekit::pack::preference::PreferenceRow {
        chosen_input_ids: ids("reward_chosen_input_ids"),
        chosen_labels: vec![],
        rejected_input_ids: ids("reward_rejected_input_ids"),
        rejected_labels: vec![],
    };
    let o = BradleyTerry.pair(&rm, &pair).unwrap();
    let got = o.loss.to_scalar::<f32>().unwrap();
    assert!((got - scalar("reward_loss")).abs() < 1e-5, "reward loss {got} vs TRL {}", scalar("reward_loss"));
    let grads = o.loss.backward().unwrap();
    let head = rm.score.clone().unwrap();
    let mut vars = rm.lora_vars();
    vars.push(("base_model.model.score.weight".into(), head));
    for (n, var) in vars {
        let want = &r[&format!("reward_grad.{n}")];
        let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-8);
        let d = max_diff(grads.get(var.as_tensor()).unwrap(), want);
        assert!(d < 1e-3 * scale, "{n}: reward gradient differs from TRL's by {d} (max {scale})");
    }
}

/// Gradient checkpointing (recompute each layer in the backward, dropout masks replayed) gives the
/// loss and adapter gradients of the plain backward.
#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    let (dir, _, row) = fixture("qwen3");
    let base = load_base(&dir, &Device::Cpu, None).unwrap();
    let mut model = Model::from_base(&base, &Device::Cpu).unwrap();
    tunekit::train::io::peft::load_into(&mut model, &dir.join("adapter")).unwrap();
    for layer in &mut model.layers {
        for lin in layer.linears_mut() {
            if let Some(l) = lin.lora.as_mut() {
                l.dropout = 0.1;
            }
        }
    }
    let batch = Batch::from_rows(&[&row], &Device::Cpu).unwrap();
    let scale = 1.0 / batch.trained as f64;
    let mut rng = tunekit::split::SplitMix64::new(9);
    let loss = model.loss_sum(&batch, Some(&mut rng), 4).unwrap();
    let plain = (&loss * scale).unwrap().backward().unwrap();
    let after_plain = rng.state();
    let mut rng = tunekit::split::SplitMix64::new(9);
    let (ck_loss, ck_grads) = model.loss_and_grads_checkpointed(&batch, Some(&mut rng), 4, scale, 0.0).unwrap();
    assert_eq!(rng.state(), after_plain, "the dropout stream advances as in the plain forward");
    let l = loss.to_scalar::<f32>().unwrap() as f64;
    assert!((l - ck_loss).abs() < 1e-6 * l.abs(), "loss {l} vs {ck_loss}");
    for ((n, v), g) in model.lora_vars().iter().zip(&ck_grads) {
        let want = plain.get(v.as_tensor()).unwrap();
        let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-12);
        let d = max_diff(g, want);
        assert!(d <= 1e-5 * scale, "{n}: checkpointed gradient differs by {d} (max {scale})");
    }
}

/// Against TRL's GRPOTrainer (tests/fixtures/train/make_grpo_fixture.py): `_compute_loss` on a fixed
/// batch of 2 prompts x 2 completions with the fixture adapter, for the dapo and grpo loss types with
/// beta 0 (ratio 1) and beta 0.04 (given old log-probs, some ratios clipped; the reference computed here
/// with the adapter off, as TRL does): the loss and every LoRA gradient. Then TRL 1.16's GSPO
/// (`importance_sampling_level="sequence"`) and `mask_truncated_completions` on the same batch
/// (`make_grpo_fixture.py --variants`), and TRL 1.16's RLOO on it (`--rloo`).
#[test]
fn grpo_gspo_and_rloo_losses_and_gradients_match_trl() {
    use tunekit::pack::rows::PackedRow;
    use tunekit::train::objectives::grpo::{Grpo, GrpoLoss, ScaleRewards, TokenBatch};
    let dir = common::root().join("tests/fixtures/train");
    let r = candle_core::safetensors::load(dir.join("trl/grpo_reference.safetensors"), &Device::Cpu).unwrap();
    let ints = |k: &str| -> Vec<usize> {
        r[k].to_dtype(DType::I64).unwrap().to_vec1::<i64>().unwrap().into_iter().map(|x| x as usize).collect()
    };
    let (plens, pids, which, clens, cids) = (
        ints("prompt_lengths"),
        ints("prompt_ids"),
        ints("completion_prompt"),
        ints("completion_lengths"),
        ints("completion_ids"),
    );
    let prompts: Vec<&[usize]> = vec![&pids[..plens[0]], &pids[plens[0]..]];
    // The four sequences packed: prompt + completion each, labels on the completion.
    let mut row = PackedRow::default();
    let mut at = 0;
    for (i, &n) in clens.iter().enumerate() {
        let p = prompts[which[i]];
        let c = &cids[at..at + n];
        at += n;
        row.input_ids.extend(p.iter().chain(c).map(|&t| t as i32));
        row.labels.extend(std::iter::repeat_n(-100, p.len()).chain(c.iter().map(|&t| t as i32)));
        row.position_ids.extend(0..(p.len() + n) as i32);
        row.seq_lengths.push((p.len() + n) as i32);
    }
    let base = load_base(&dir.join("llama"), &Device::Cpu, None).unwrap();
    let mut model = Model::from_base(&base, &Device::Cpu).unwrap();
    tunekit::train::io::peft::load_into(&mut model, &dir.join("llama/adapter")).unwrap();
    let batch = Batch::from_rows(&[&row], &Device::Cpu).unwrap();
    let adv: Vec<f32> = r["advantages"].to_vec1::<f32>().unwrap();
    let adv_tokens: Vec<f32> = clens.iter().enumerate().flat_map(|(i, &n)| std::iter::repeat_n(adv[i], n)).collect();
    let adv_t = Tensor::from_vec(adv_tokens.clone(), adv_tokens.len(), &Device::Cpu).unwrap();
    let variants = candle_core::safetensors::load(dir.join("trl/gspo_reference.safetensors"), &Device::Cpu).unwrap();
    // Ended at EOS (2): the others were cut at max_completion_length.
    let mut ends = clens.iter().scan(0, |at, &n| {
        *at += n;
        Some(*at)
    });
    let truncated: Vec<bool> = clens.iter().map(|_| cids[ends.next().unwrap() - 1] != 2).collect();
    assert_eq!(truncated, vec![false, true, false, true]);
    // (key, reference, loss type, beta, sequence-level ratios, truncated completions masked)
    let mut cases = vec![];
    for loss in [GrpoLoss::Dapo, GrpoLoss::Grpo] {
        for beta in [0.0, 0.04] {
            let key = format!("{}_beta{beta:?}", if loss == GrpoLoss::Dapo { "dapo" } else { "grpo" });
            cases.push((key, &r, loss, beta, false, false));
        }
    }
    cases.push(("gspo_grpo".into(), &variants, GrpoLoss::Grpo, 0.04, true, false));
    cases.push(("masked_dapo".into(), &variants, GrpoLoss::Dapo, 0.04, false, true));
    cases.push(("gspo_masked_grpo".into(), &variants, GrpoLoss::Grpo, 0.04, true, true));
    for (key, r, loss, beta, sequence_level, mask_truncated) in cases {
        let g = Grpo {
            epsilon: 0.2,
            epsilon_high: 0.28,
            beta,
            loss,
            scale_rewards: ScaleRewards::Group,
            num_iterations: 1,
            kl_bias_correction: true,
            sequence_level,
            mask_truncated,
        };
        let masked: Vec<bool> = truncated.iter().map(|&t| t && mask_truncated).collect();
        let w = g.token_weights(&clens, &masked, &[vec![0, 1, 2, 3]], 6).remove(0);
        let w = Tensor::from_vec(w.clone(), w.len(), &Device::Cpu).unwrap();
        let (logps, _) = model.token_log_probs(&batch, 0.7, false).unwrap();
        let (old, refs) = if beta != 0.0 {
            model.set_lora_enabled(false);
            let (rl, _) = tunekit::train::graph::no_grad(|| model.token_log_probs(&batch, 0.7, false)).unwrap();
            model.set_lora_enabled(true);
            let want = &r[&format!("{key}_ref_logps")];
            assert!(
                max_diff(&rl, want) < 1e-5,
                "{key}: reference log-probs differ from TRL's by {}",
                max_diff(&rl, want)
            );
            (Some(r[&format!("{key}_old_logps")].clone()), Some(rl))
        } else {
            (None, None)
        };
        let tb = TokenBatch {
            logps: &logps,
            old_logps: old.as_ref(),
            ref_logps: refs.as_ref(),
            advantages: &adv_t,
            weights: &w,
            lengths: &clens,
        };
        let (l, _) = g.loss(&tb).unwrap();
        let (got, want) = (l.to_scalar::<f32>().unwrap(), r[&format!("{key}_loss")].to_vec1::<f32>().unwrap()[0]);
        assert!((got - want).abs() < 1e-5 * want.abs().max(1.0), "{key}: loss {got} vs TRL {want}");
        let grads = l.backward().unwrap();
        for (n, var) in model.lora_vars() {
            let want = &r[&format!("{key}_grad.{n}")];
            let scale =
                want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-8);
            let d = max_diff(grads.get(var.as_tensor()).unwrap(), want);
            assert!(d < 1e-3 * scale, "{key} {n}: gradient differs from TRL's by {d} (max {scale})");
        }
    }
    // RLOO (TRL 1.16's RLOOTrainer, `make_grpo_fixture.py --rloo`): the KL-penalised rewards'
    // leave-one-out advantages from TRL's old log-probs and tunekit's reference, then the loss with one
    // clipped ratio per completion.
    use tunekit::train::objectives::rloo::{advantages, Rloo};
    let r = candle_core::safetensors::load(dir.join("trl/rloo_reference.safetensors"), &Device::Cpu).unwrap();
    model.set_lora_enabled(false);
    let (refs, _) = tunekit::train::graph::no_grad(|| model.token_log_probs(&batch, 0.7, false)).unwrap();
    model.set_lora_enabled(true);
    assert!(max_diff(&refs, &r["rloo_ref_logps"]) < 1e-5);
    let (old, refs) = (r["rloo_old_logps"].to_vec1::<f32>().unwrap(), refs.to_vec1::<f32>().unwrap());
    let per_seq = |v: &[f32]| -> Vec<f64> {
        let mut at = 0;
        clens
            .iter()
            .map(|&n| {
                at += n;
                v[at - n..at].iter().map(|&x| x as f64).sum()
            })
            .collect()
    };
    let diff: Vec<f32> = old.iter().zip(&refs).map(|(o, r)| o - r).collect();
    let rewards: Vec<f64> = r["rloo_rewards"].to_vec1::<f32>().unwrap().iter().map(|&x| x as f64).collect();
    let (_, adv) = advantages(&rewards, &per_seq(&diff), 0.05, 2, false);
    for (a, want) in adv.iter().zip(r["rloo_advantages"].to_vec1::<f32>().unwrap()) {
        assert!((a - want as f64).abs() < 1e-5, "RLOO advantage {a} vs TRL's {want}");
    }
    let rloo = Rloo { epsilon: 0.2, epsilon_high: 0.28, beta: 0.05, num_iterations: 1, normalize_advantages: false };
    let (lp, _) = model.token_log_probs(&batch, 0.7, false).unwrap();
    let mut at = 0;
    let sums: Vec<Tensor> = clens
        .iter()
        .map(|&n| {
            at += n;
            lp.narrow(0, at - n, n).unwrap().sum_keepdim(0).unwrap()
        })
        .collect();
    let logps = Tensor::cat(&sums, 0).unwrap();
    let old_t = Tensor::from_vec(per_seq(&old).iter().map(|&x| x as f32).collect::<Vec<_>>(), 4, &Device::Cpu).unwrap();
    let adv_t = Tensor::from_vec(adv.iter().map(|&x| x as f32).collect::<Vec<_>>(), 4, &Device::Cpu).unwrap();
    let (l, _) = rloo.loss(&logps, &old_t, &adv_t, 4).unwrap();
    let (got, want) = (l.to_scalar::<f32>().unwrap(), r["rloo_loss"].to_vec1::<f32>().unwrap()[0]);
    assert!((got - want).abs() < 1e-5 * want.abs().max(1.0), "RLOO loss {got} vs TRL {want}");
    let grads = l.backward().unwrap();
    for (n, var) in model.lora_vars() {
        let want = &r[&format!("rloo_grad.{n}")];
        let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-8);
        let d = max_diff(grads.get(var.as_tensor()).unwrap(), want);
        assert!(d < 1e-3 * scale, "RLOO {n}: gradient differs from TRL's by {d} (max {scale})");
    }
}

/// Against TRL's PPO code (tests/fixtures/train/make_ppo_fixture.py runs TRL 0.29.0's own lines of
/// `PPOTrainer.train` on a fixed batch): per-token rewards, GAE advantages and returns for the k1 and k3
/// KL estimators with and without whitened rewards, then the policy, value and total losses of a
/// micro-batch and their gradients with respect to the new log-probabilities and value predictions.
#[test]
fn ppo_rewards_advantages_and_losses_match_trl() {
    use tunekit::train::objectives::ppo::{KlEstimator, Ppo};
    let r = candle_core::safetensors::load(
        common::root().join("tests/fixtures/train/trl/ppo_reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let v = |k: &str| -> Vec<f64> { r[k].to_vec1::<f32>().unwrap().into_iter().map(|x| x as f64).collect() };
    let lengths: Vec<usize> =
        r["lengths"].to_dtype(DType::I64).unwrap().to_vec1::<i64>().unwrap().into_iter().map(|x| x as usize).collect();
    let width = *lengths.iter().max().unwrap();
    // Per completion: its tokens, and its value positions (one more when it is shorter than the width).
    let split = |flat: &[f64], per: &dyn Fn(usize) -> usize| -> Vec<Vec<f64>> {
        let mut at = 0;
        lengths
            .iter()
            .map(|&n| {
                let m = per(n);
                at += m;
                flat[at - m..at].to_vec()
            })
            .collect()
    };
    let tokens = |n: usize| n;
    let positions = |n: usize| if n < width { n + 1 } else { n };
    let (logps, refs, values) =
        (split(&v("logprobs"), &tokens), split(&v("ref_logprobs"), &tokens), split(&v("values"), &positions));
    let close = |a: &[f64], b: &[f64], what: &str| {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() < 1e-5 * y.abs().max(1.0), "{what}[{i}]: {x} vs TRL {y}");
        }
    };
    for (est, whiten) in
        [(KlEstimator::K1, false), (KlEstimator::K1, true), (KlEstimator::K3, false), (KlEstimator::K3, true)]
    {
        let key =
            format!("{}_{}", if est == KlEstimator::K1 { "k1" } else { "k3" }, if whiten { "whiten" } else { "plain" });
        let ppo = Ppo {
            kl_coef: 0.05,
            kl_estimator: est,
            gamma: 1.0,
            lam: 0.95,
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
            ppo_epochs: 1,
            num_mini_batches: 1,
            missing_eos_penalty: None,
            whiten_rewards: whiten,
        };
        let p = ppo.process(&logps, &refs, &values, &v("scores"));
        let flat = |x: &[Vec<f64>]| -> Vec<f64> { x.iter().flatten().copied().collect() };
        close(&flat(&p.rewards), &v(&format!("{key}_rewards")), &format!("{key} rewards"));
        close(&flat(&p.advantages), &v(&format!("{key}_advantages")), &format!("{key} advantages"));
        close(&flat(&p.returns), &v(&format!("{key}_returns")), &format!("{key} returns"));
        let t = |x: Vec<f64>| {
            let x: Vec<f32> = x.into_iter().map(|x| x as f32).collect();
            Tensor::from_vec(x.clone(), x.len(), &Device::Cpu).unwrap()
        };
        let new = candle_core::Var::from_tensor(&r[&format!("{key}_new_logprobs")]).unwrap();
        let vpred = candle_core::Var::from_tensor(&r[&format!("{key}_vpred")]).unwrap();
        let (loss, stats) = ppo
            .loss(
                new.as_tensor(),
                &t(v("logprobs")),
                &t(flat(&p.advantages)),
                vpred.as_tensor(),
                &t(v("values")),
                &t(flat(&p.returns)),
            )
            .unwrap();
        let scalar = |k: &str| r[&format!("{key}_{k}")].to_vec1::<f32>().unwrap()[0] as f64;
        close(
            &[stats[0], stats[1], loss.to_scalar::<f32>().unwrap() as f64],
            &[scalar("pg_loss"), scalar("vf_loss"), scalar("loss")],
            &format!("{key} losses"),
        );
        let g = loss.backward().unwrap();
        let grad = |x: &candle_core::Var| -> Vec<f64> {
            g.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap().into_iter().map(|x| x as f64).collect()
        };
        close(&grad(&new), &v(&format!("{key}_grad_new_logprobs")), &format!("{key} d loss / d logprobs"));
        close(&grad(&vpred), &v(&format!("{key}_grad_vpred")), &format!("{key} d loss / d values"));
    }
}
