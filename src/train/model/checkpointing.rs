//! Gradient checkpointing: keep only each layer's input during the forward and recompute one layer
//! at a time in the backward, replaying the same dropout masks.

use super::batch::Batch;
use super::softmax::MaskCache;
use super::Model;
use crate::split::SplitMix64;
use candle_core::{Tensor, Var};

impl Model {
    /// Gradient checkpointing: the loss sum of `loss_sum` and the gradients of `scale * loss` for
    /// every trained variable (in `trained_vars` order: the adapters, or every weight), keeping only each layer's input during the forward and recomputing one
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
        let trained = self.trained_vars();
        if batch.trained == 0 {
            let zeros = trained.iter().map(|(_, v)| v.zeros_like()).collect::<candle_core::Result<_>>()?;
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
        let mut head = (loss * scale)?.backward()?;
        let mut upstream = head.remove(top.as_tensor()).expect("the head depends on x");
        // In full fine-tuning the final norm's and the head's weights have their gradients here.
        keep_grads(&mut found, &mut head, self.full.iter().map(|(_, v)| v))?;
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
            match self.is_full() {
                true => keep_grads(&mut found, &mut grads, self.full.iter().map(|(_, v)| v))?,
                false => keep_grads(&mut found, &mut grads, layer.trained_vars())?,
            }
            upstream = grads.remove(input.as_tensor()).expect("a layer's output depends on its input");
        }
        if self.is_full() {
            // The embedding's rows: the first layer's input gradient added at its tokens (a tied
            // head's gradient is already in `found`: the two add up).
            let rows = self.embed_rows(&batch.input_ids)?;
            let mut grads = (rows * &upstream)?.sum_all()?.backward()?;
            keep_grads(&mut found, &mut grads, self.full.iter().map(|(_, v)| v))?;
        }
        let grads = trained
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

/// Moves the gradients of `vars` out of a backward's store into `found`, adding to what an earlier
/// backward gave the same variable (a tied embedding's two uses, the first from the head's).
fn keep_grads<'a>(
    found: &mut std::collections::HashMap<candle_core::TensorId, Tensor>,
    grads: &mut candle_core::backprop::GradStore,
    vars: impl IntoIterator<Item = &'a Var>,
) -> candle_core::Result<()> {
    for v in vars {
        if let Some(g) = grads.remove(v.as_tensor()) {
            let id = v.as_tensor().id();
            let g = match found.remove(&id) {
                Some(before) => (before + g)?,
                None => g,
            };
            found.insert(id, g);
        }
    }
    Ok(())
}
