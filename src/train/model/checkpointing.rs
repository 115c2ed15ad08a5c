//! Gradient checkpointing: keep only each layer's input during the forward and recompute one layer
//! at a time in the backward, replaying the same dropout masks.

use super::batch::Batch;
use super::softmax::MaskCache;
use super::Model;
use crate::split::SplitMix64;
use candle_core::{Tensor, Var};

impl Model {
    /// Gradient checkpointing: the loss sum of `loss_sum` and the gradients of `scale * loss` for
    /// every adapter variable (in `lora_vars` order), keeping only each layer's input during the forward and recomputing one
    /// layer at a time in the backward (the same dropout masks replayed). Peak memory is one layer's
    /// activations instead of all of them, for about one more forward pass. A mixture of experts
    /// adds `aux_weight` x its load-balancing loss to the objective (each sparse layer's part in
    /// that layer's recompute) and leaves the forward's routing, detached, for `take_routing`.
    pub fn loss_and_grads_checkpointed(
        &self,
        batch: &Batch,
        rng: Option<&mut SplitMix64>,
        chunk: usize,
        scale: f64,
        aux_weight: f64,
    ) -> candle_core::Result<(f64, Vec<Tensor>)> {
        let mut found: std::collections::HashMap<candle_core::TensorId, Tensor> = Default::default();
        if batch.trained == 0 {
            let zeros = self.lora_vars().iter().map(|(_, v)| v.zeros_like()).collect::<candle_core::Result<_>>()?;
            return Ok((0.0, zeros));
        }
        let rot = self.rotations(&batch.position_ids)?;
        let mut masks = MaskCache::default();
        let mut rng_states = Vec::with_capacity(self.layers.len());
        let mut rng = rng;
        let mut inputs = Vec::with_capacity(self.layers.len());
        let mut x = self.embed_rows(&batch.input_ids)?;
        self.routing.borrow_mut().clear();
        for layer in &self.layers {
            rng_states.push(rng.as_ref().map(|r| r.state()));
            let y = self.layer_forward(layer, &x, &rot, &batch.seq_lengths, &mut masks, rng.as_deref_mut(), None)?;
            if let Some((_, r)) = self.routing.borrow_mut().last_mut() {
                r.prob_sum = r.prob_sum.detach(); // the recompute brings the graph back
            }
            inputs.push(x);
            x = y.detach();
        }
        let routed = self.take_routing();
        let records: Vec<_> = routed.iter().map(|(_, r)| r).collect();
        let balance = match aux_weight {
            0.0 => None,
            _ => super::routing::balance_weights_of(&records)?,
        };
        // The head: norm, logits at trained positions, cross-entropy; its gradient flows into x.
        let top = Var::from_tensor(&x)?;
        let h = self.final_norm(top.as_tensor())?;
        let loss = self.head_loss(&h, batch, chunk)?;
        let loss_value = loss.to_scalar::<f32>()? as f64;
        let mut upstream = (loss * scale)?.backward()?.remove(top.as_tensor()).expect("the head depends on x");
        for (i, layer) in self.layers.iter().enumerate().rev() {
            let input = Var::from_tensor(&inputs[i])?;
            let mut replay = rng_states[i].map(SplitMix64::from_state);
            let y = self.layer_forward(
                layer,
                input.as_tensor(),
                &rot,
                &batch.seq_lengths,
                &mut masks,
                replay.as_mut(),
                None,
            )?;
            let mut objective = (y * &upstream)?.sum_all()?;
            if let (Some(w), Some((_, r))) = (&balance, self.take_routing().pop()) {
                objective = (objective + (super::routing::layer_term(&r, w)? * aux_weight)?)?;
            }
            let mut grads = objective.backward()?;
            for v in layer.trained_vars() {
                if let Some(g) = grads.remove(v.as_tensor()) {
                    found.insert(v.as_tensor().id(), g);
                }
            }
            if i > 0 {
                upstream = grads.remove(input.as_tensor()).expect("a layer's output depends on its input");
            }
        }
        let grads = self
            .lora_vars()
            .iter()
            .map(|(n, v)| match found.remove(&v.as_tensor().id()) {
                Some(g) => Ok(g),
                None if super::moe::is_expert_adapter(n) => v.zeros_like(), // no token routed to it
                None => Err(candle_core::Error::Msg(format!("no gradient reached {n}"))),
            })
            .collect::<candle_core::Result<_>>()?;
        *self.routing.borrow_mut() = routed;
        Ok((loss_value, grads))
    }
}
