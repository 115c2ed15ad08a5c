//! A packed micro-batch as the model takes it: every row's segments back to back, positions from
//! `position_ids`, and the positions whose next token is trained with that token (the loss shifts
//! by one: position t predicts labels[t+1], as transformers does).

use anyhow::Result;
use candle_core::{Device, Tensor};

/// One packed micro-batch, flattened: all rows' segments back to back.
pub struct Batch {
    pub input_ids: Tensor,    // [T] u32
    pub position_ids: Tensor, // [T] u32
    pub seq_lengths: Vec<usize>,
    /// Positions t whose next token is trained, and that token.
    pub loss_positions: Tensor, // [N] u32
    pub loss_targets: Tensor, // [N] u32
    pub tokens: usize,
    pub trained: usize,
}

impl Batch {
    /// From packed rows (labels aligned with input_ids; the loss predicts labels[t+1] from t).
    pub fn from_rows(rows: &[&crate::pack::rows::PackedRow], device: &Device) -> Result<Batch> {
        let (mut ids, mut pos, mut lens, mut lp, mut lt) = (vec![], vec![], vec![], vec![], vec![]);
        for r in rows {
            let base = ids.len();
            ids.extend(r.input_ids.iter().map(|&t| t as u32));
            pos.extend(r.position_ids.iter().map(|&p| p as u32));
            let mut at = 0usize;
            for &l in &r.seq_lengths {
                let l = l as usize;
                lens.push(l);
                for t in at..at + l - 1 {
                    let y = r.labels[t + 1];
                    if y != -100 {
                        lp.push((base + t) as u32);
                        lt.push(y as u32);
                    }
                }
                at += l;
            }
        }
        let (tokens, trained) = (ids.len(), lp.len());
        Ok(Batch {
            input_ids: Tensor::from_vec(ids, tokens, device)?,
            position_ids: Tensor::from_vec(pos, tokens, device)?,
            seq_lengths: lens,
            loss_positions: Tensor::from_vec(lp, trained, device)?,
            loss_targets: Tensor::from_vec(lt, trained, device)?,
            tokens,
            trained,
        })
    }
}
