//! What one training micro-batch holds in memory at a model's shapes, estimated before training
//! (`tunekit doctor`, and `train --full` before its first step): the frozen weights, the adapters
//! with their gradients and AdamW moments (in full fine-tuning: every weight in f32, its gradient
//! and its moments, f32 or 8-bit), the
//! activations the backward keeps per layer (all layers, or only each layer's input with gradient
//! checkpointing, plus one layer recomputed), attention (its probabilities per packed segment, or
//! linear in length in the tiled CPU kernels), and the loss
//! head's chunk of logits. An estimate for planning; `train --probe-memory` measures the real peak.

use super::config::ModelConfig;
use serde::Serialize;

/// How the trainer will hold the model and run the step.
#[derive(Debug, Clone)]
pub struct StepSettings {
    /// Bytes per frozen weight: 4 (f32, the CPU), 2 (bf16), about 0.56 (4-bit QLoRA blocks).
    pub weight_bytes: f64,
    /// Bytes per activation: 4 (f32) or 2 (bf16).
    pub activation_bytes: usize,
    pub lora_r: usize,
    /// Adapted projections per layer (7 for q, k, v, o, gate, up, down).
    pub targets: usize,
    pub gradient_checkpointing: bool,
    pub logits_chunk: usize,
    /// Full fine-tuning: the optimizer's bytes per parameter (8 for f32 AdamW, about 2 for 8-bit);
    /// None for adapters.
    pub full_state_bytes: Option<f64>,
    /// The CPU's f32 kernels run the step: attention in memory linear in the segment's length
    /// (tiled), and each chunk of logits turned into its own gradient in place. Otherwise (the
    /// GPU's fused ops, the plain graph) each segment's probabilities [heads, L, L] (a block of
    /// query rows at a time past a budget), and a chunk's logits and gradient apart.
    pub cpu_kernels: bool,
}

/// Whether training on `device` runs the CPU's kernels: on the CPU (where a GPU build may find a
/// GPU, its fused ops).
pub fn cpu_kernels_on(device: crate::train::device::DeviceSpec) -> bool {
    use crate::train::device::DeviceSpec;
    matches!(device, DeviceSpec::Cpu) || (matches!(device, DeviceSpec::Auto) && !cfg!(feature = "cuda"))
}

/// The packed segments of one micro-batch, by length.
#[derive(Debug, Clone, Serialize)]
pub struct MicroBatch {
    pub rows: usize,
    pub tokens: usize,
    pub longest_segment: usize,
    /// Sum of squared segment lengths (attention is per segment).
    pub segment_square_sum: u64,
}

impl MicroBatch {
    /// The micro-batch of `rows` rows whose packed segments have the lengths `segments` yields.
    pub fn of<I: Iterator<Item = usize>>(rows: usize, segments: impl Fn() -> I) -> MicroBatch {
        MicroBatch {
            rows,
            tokens: segments().sum(),
            longest_segment: segments().max().unwrap_or(0),
            segment_square_sum: segments().map(|l| (l * l) as u64).sum(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct MemoryEstimate {
    /// The process itself: tokenizer, shards and buffers, and the allocator's slack (freed step
    /// buffers it holds on to for a while).
    pub runtime_mb: f64,
    pub weights_mb: f64,
    /// LoRA's adapters with their gradients and moments (0 in full fine-tuning).
    pub adapters_mb: f64,
    /// Full fine-tuning: every weight's gradient (0 for adapters).
    pub gradients_mb: f64,
    /// Full fine-tuning: AdamW's two moments per weight (0 for adapters).
    pub optimizer_mb: f64,
    pub activations_mb: f64,
    pub loss_head_mb: f64,
    pub total_mb: f64,
}

const MB: f64 = 1024.0 * 1024.0;
/// What a training process holds beside the model and the step (shards, buffers), and the
/// allocator's slack as a share of the step's activations and loss head (it keeps freed buffers for
/// 3 s, 60 s at rows up to 4,096 tokens, `crate::allocator`, and a step's buffers of many sizes do
/// not all fit the freed ones; held 60 s, a 512- or 2,048-token step peaked the same), fitted
/// on the CPU: SmolLM2 at 512-2,048 tokens with and without checkpointing, and one conversation of
/// 2k-37k tokens on a Llama-shaped model (benches/RESULTS.md, "Long conversations").
const RUNTIME_MB: f64 = 60.0;
const ALLOCATOR_SLACK: f64 = 0.1;
/// With gradient checkpointing, the recomputed layer's activations and their gradients, in layers'
/// worth (fitted as [`RUNTIME_MB`]: some of the gradients replace activations already freed).
const RECOMPUTED_LAYERS: f64 = 1.75;

/// Frozen parameters of the base: embeddings (and an untied output layer), projections, norms.
pub fn base_parameters(c: &ModelConfig) -> u64 {
    let (h, i, hd) = (c.hidden_size as u64, c.intermediate_size as u64, c.head_dim() as u64);
    let (q, kv) = (c.num_attention_heads as u64 * hd, c.kv_heads() as u64 * hd);
    let attention = h * q + 2 * h * kv + q * h + 2 * h;
    let layers: u64 = (0..c.num_hidden_layers)
        .map(|l| match sparse_layer(c, l) {
            // A mixture's layer: every expert's three projections and the router.
            Some(m) => attention + m.experts as u64 * (3 * h * m.intermediate as u64 + h),
            None => attention + 3 * h * i,
        })
        .sum();
    let embed = c.vocab_size as u64 * h * if c.tie_word_embeddings { 1 } else { 2 };
    embed + layers + h
}

/// The mixture of experts of layer `l`, where the family makes it sparse.
fn sparse_layer(c: &ModelConfig, l: usize) -> Option<crate::train::model::family::Moe> {
    let a = crate::train::model::family::describe(c).ok()?;
    a.layers.get(l).filter(|p| p.sparse).and(a.moe)
}

/// The memory of a step over `mb` at the model's shapes.
pub fn estimate(c: &ModelConfig, mb: &MicroBatch, s: &StepSettings) -> MemoryEstimate {
    let (h, i, hd) = (c.hidden_size as f64, c.intermediate_size as f64, c.head_dim() as f64);
    let (q, kv) = (c.num_attention_heads as f64 * hd, c.kv_heads() as f64 * hd);
    let layers = c.num_hidden_layers as f64;
    let params = base_parameters(c) as f64;
    // Full fine-tuning: f32 weights with a gradient and the optimizer's state each, no adapter.
    let (weights, gradients, optimizer) = match s.full_state_bytes {
        Some(state) => (params * 4.0, params * 4.0, params * state),
        None => (params * s.weight_bytes, 0.0, 0.0),
    };
    let s = &StepSettings { lora_r: if s.full_state_bytes.is_some() { 0 } else { s.lora_r }, ..s.clone() };
    // A and B per adapted projection (in f32), with their gradients and two AdamW moments.
    let ins_outs = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)];
    let per_layer: f64 = ins_outs.iter().take(s.targets.min(7)).map(|(a, b)| (a + b) * s.lora_r as f64).sum();
    // A mixture's sparse layers: each expert's gate_up and down adapters in place of the MLP's.
    let moe = (0..c.num_hidden_layers).filter_map(|l| sparse_layer(c, l)).collect::<Vec<_>>();
    let sparse_layers = moe.len() as f64;
    let expert_adapters = moe.first().map_or(0.0, |m| {
        let ie = m.intermediate as f64;
        let mlp_targets = s.targets.saturating_sub(4).min(3) as f64;
        let mlp_dense: f64 =
            ins_outs[4..].iter().take(s.targets.saturating_sub(4)).map(|(a, b)| (a + b) * s.lora_r as f64).sum();
        m.experts as f64 * (mlp_targets / 3.0) * ((h + 2.0 * ie) + (ie + h)) * s.lora_r as f64 - mlp_dense
    });
    let adapters = (per_layer * layers + expert_adapters * sparse_layers) * 4.0 * 4.0;
    // Kept for the backward, per token and layer (the fused norms, softmax and SwiGLU keep their
    // inputs or outputs only; residual sums keep nothing): both norms' inputs, q/k/v before and
    // after rope, the attention output, gate, up, SiLU(gate) and their product, the adapters'
    // r-wide middles; and the attention probabilities per head over each segment.
    let t = mb.tokens as f64;
    // A sparse layer keeps, per token, its k experts' gate, up and their products, the rows gathered
    // for them and their outputs, and the router's probabilities; the larger layer counts.
    let mlp = moe.first().map_or(4.0 * i, |m| {
        let sparse = m.top_k as f64 * (4.0 * m.intermediate as f64 + 2.0 * h) + m.experts as f64;
        if moe.len() < c.num_hidden_layers {
            sparse.max(4.0 * i)
        } else {
            sparse
        }
    });
    let dense = t * (2.0 * h + 2.0 * (q + 2.0 * kv) + q + mlp + 2.0 * s.targets as f64 * s.lora_r as f64);
    let hq = c.num_attention_heads as f64;
    let attention = if s.cpu_kernels {
        // Each query's log-sum-exp and the backward's rowsum(dY * Y) per head; the backward's
        // tasks' own dQ, dK, dV rows (one task per thread at a time, each up to the segment).
        2.0 * hq * t + rayon::current_num_threads() as f64 * 3.0 * mb.longest_segment as f64 * hd
    } else {
        // Each segment's probabilities, a block of query rows at a time past the budget (with the
        // block's gradient, in f32).
        (hq * mb.segment_square_sum as f64)
            .min(2.0 * super::recomputed::PROBS_BUDGET_BYTES as f64 / s.activation_bytes as f64)
    };
    let one_layer = (dense + attention) * s.activation_bytes as f64;
    let activations = if s.gradient_checkpointing {
        // Each layer's input, and one layer's activations recomputed with their gradients.
        layers * t * h * s.activation_bytes as f64 + RECOMPUTED_LAYERS * one_layer
    } else {
        // All layers, and one layer's gradients in flight during the backward.
        (layers + 1.0) * one_layer
    };
    // A chunk of logits and its gradient (the head is fused: one chunk at a time; the CPU writes the
    // gradient over the logits), in f32, and the final hidden states with their gradient.
    let chunk_buffers = if s.cpu_kernels { 1.0 } else { 2.0 };
    let head =
        chunk_buffers * s.logits_chunk.min(mb.tokens.max(1)) as f64 * c.vocab_size as f64 * 4.0 + 2.0 * t * h * 4.0;
    let runtime = RUNTIME_MB * MB + ALLOCATOR_SLACK * (activations + head);
    let total = weights + adapters + gradients + optimizer + activations + head + runtime;
    MemoryEstimate {
        runtime_mb: runtime / MB,
        weights_mb: weights / MB,
        adapters_mb: adapters / MB,
        gradients_mb: gradients / MB,
        optimizer_mb: optimizer / MB,
        activations_mb: activations / MB,
        loss_head_mb: head / MB,
        total_mb: total / MB,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2() -> ModelConfig {
        serde_json::from_value(serde_json::json!({
            "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
            "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
            "tie_word_embeddings": true
        }))
        .unwrap()
    }

    #[test]
    fn parameters_match_the_published_count_and_memory_grows_with_the_batch() {
        // SmolLM2-135M: 134,515,008 parameters.
        assert_eq!(base_parameters(&smollm2()), 134_515_008);
        let s = StepSettings {
            weight_bytes: 4.0,
            activation_bytes: 4,
            lora_r: 8,
            targets: 7,
            gradient_checkpointing: false,
            logits_chunk: 128,
            full_state_bytes: None,
            cpu_kernels: false,
        };
        let mb = |rows: usize, len: usize| MicroBatch {
            rows,
            tokens: rows * len,
            longest_segment: len,
            segment_square_sum: (rows * len * len) as u64,
        };
        let (one, two) = (estimate(&smollm2(), &mb(1, 512), &s), estimate(&smollm2(), &mb(2, 512), &s));
        assert!(two.activations_mb > 1.9 * one.activations_mb && two.weights_mb == one.weights_mb);
        let ck = estimate(&smollm2(), &mb(2, 512), &StepSettings { gradient_checkpointing: true, ..s.clone() });
        assert!(ck.activations_mb < two.activations_mb / 5.0, "{ck:?} vs {two:?}");
        // Full fine-tuning: weights, gradients and f32 moments are 16 bytes per parameter (2.15 GB
        // for SmolLM2); 8-bit moments save three quarters of the moments.
        let full = estimate(&smollm2(), &mb(1, 512), &StepSettings { full_state_bytes: Some(8.0), ..s.clone() });
        assert_eq!(
            (full.adapters_mb, (full.weights_mb + full.gradients_mb + full.optimizer_mb).round()),
            (0.0, 2053.0)
        );
        let q8 = estimate(&smollm2(), &mb(1, 512), &StepSettings { full_state_bytes: Some(2.03), ..s });
        assert!(q8.total_mb < full.total_mb - 700.0, "{q8:?} vs {full:?}");
    }

    #[test]
    fn a_mixture_counts_every_expert() {
        // Qwen3-30B-A3B: 30.5B parameters (128 experts of 768 in each of 48 layers; q/k norms aside).
        let c: ModelConfig = serde_json::from_value(serde_json::json!({
            "model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 48,
            "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936,
            "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
            "tie_word_embeddings": false
        }))
        .unwrap();
        let n = base_parameters(&c) as f64;
        assert!((n / 30.53e9 - 1.0).abs() < 0.005, "{n}"); // gpt-oss-20b: 20.9B (32 experts of 2880 in each of 24 layers, an untied head of 201,088).
        let c: ModelConfig = serde_json::from_value(serde_json::json!({
            "model_type": "gpt_oss", "hidden_size": 2880, "intermediate_size": 2880, "num_hidden_layers": 24,
            "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 201088,
            "num_local_experts": 32, "num_experts_per_tok": 4, "sliding_window": 128, "tie_word_embeddings": false
        }))
        .unwrap();
        let n = base_parameters(&c) as f64;
        assert!((n / 20.91e9 - 1.0).abs() < 0.005, "{n}");
    }
}
