//! A reward model's output: the scalar score head (`Model::score`, [1, hidden]) on the final hidden
//! state of a sequence's last token, for one sequence (with the graph, for training) or a packed
//! batch of them (without, for scoring).

use super::Model;
use anyhow::Result;
use candle_core::{DType, Tensor};

impl Model {
    /// Adds a scalar reward head, initialised as transformers does.
    pub fn add_score_head(&mut self, seed: u64) -> Result<()> {
        self.score = Some(crate::train::adapters::score::new_score_head(self.config.hidden_size, seed, &self.device)?);
        Ok(())
    }

    /// The reward of one sequence: the score head on the last token's final hidden state.
    pub fn reward(&self, ids: &[i32]) -> candle_core::Result<Tensor> {
        let head = self.score.as_ref().ok_or_else(|| candle_core::Error::Msg("the model has no reward head".into()))?;
        let t = ids.len();
        let ids_t = Tensor::from_vec(ids.iter().map(|&x| x as u32).collect::<Vec<_>>(), t, &self.device)?;
        let pos = Tensor::arange(0u32, t as u32, &self.device)?;
        let h = self.hidden(&ids_t, &pos, &[t], None)?;
        h.narrow(0, t - 1, 1)?.to_dtype(DType::F32)?.matmul(&head.as_tensor().t()?)?.squeeze(1)?.squeeze(0)
    }

    /// The rewards of several sequences under the score head, as one packed batch (no graph).
    pub fn rewards(&self, seqs: &[&[u32]]) -> candle_core::Result<Vec<f32>> {
        let head = self.score.as_ref().ok_or_else(|| candle_core::Error::Msg("the model has no reward head".into()))?;
        crate::train::graph::no_grad(|| {
            let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
            let ids: Vec<u32> = seqs.iter().flat_map(|s| s.iter().copied()).collect();
            let pos: Vec<u32> = lens.iter().flat_map(|&l| 0..l as u32).collect();
            let t = ids.len();
            let h = self.hidden(
                &Tensor::from_vec(ids, t, &self.device)?,
                &Tensor::from_vec(pos, t, &self.device)?,
                &lens,
                None,
            )?;
            let last: Vec<u32> = lens
                .iter()
                .scan(0usize, |end, &l| {
                    *end += l;
                    Some(*end as u32 - 1)
                })
                .collect();
            let last = h.index_select(&Tensor::from_vec(last, seqs.len(), &self.device)?, 0)?;
            last.to_dtype(DType::F32)?.matmul(&head.as_tensor().t()?)?.squeeze(1)?.to_vec1::<f32>()
        })
    }
}
