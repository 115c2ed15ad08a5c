//! Packed rows: samples concatenated with positions restarting per segment, the segment lengths
//! recorded, and the first label of every segment masked so no segment learns from the previous one.

use super::bfd::best_fit_decreasing;
use crate::tokenize::Sample;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PackMode {
    /// Best-fit-decreasing bin packing of whole samples into rows of --seq-len tokens.
    Bfd,
    /// One sample per row.
    None,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct PackedRow {
    pub input_ids: Vec<i32>,
    pub labels: Vec<i32>,
    pub position_ids: Vec<i32>,
    pub seq_lengths: Vec<i32>,
}

impl PackedRow {
    pub fn push(&mut self, s: &Sample) {
        self.input_ids.extend(s.input_ids.iter().map(|&t| t as i32));
        let first = self.labels.len();
        self.labels.extend_from_slice(&s.labels);
        self.labels[first] = -100;
        self.position_ids.extend(0..s.len() as i32);
        self.seq_lengths.push(s.len() as i32);
    }
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
}

/// Packs a window of samples into rows.
pub fn pack(samples: &[Sample], mode: PackMode, seq_len: usize) -> Vec<PackedRow> {
    match mode {
        PackMode::None => samples
            .iter()
            .map(|s| {
                let mut r = PackedRow::default();
                r.push(s);
                r
            })
            .collect(),
        PackMode::Bfd => {
            let lengths: Vec<usize> = samples.iter().map(Sample::len).collect();
            best_fit_decreasing(&lengths, seq_len)
                .into_iter()
                .map(|bin| {
                    let mut r = PackedRow::default();
                    for i in bin {
                        r.push(&samples[i]);
                    }
                    r
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize, trained_from: usize) -> Sample {
        Sample {
            input_ids: (0..n as u32).map(|i| 1000 + i).collect(),
            labels: (0..n).map(|i| if i >= trained_from { 1000 + i as i32 } else { -100 }).collect(),
        }
    }

    #[test]
    fn segments_restart_positions_and_mask_first_label() {
        let samples = vec![sample(5, 0), sample(3, 1), sample(4, 2)];
        let rows = pack(&samples, PackMode::Bfd, 8);
        let total: usize = rows.iter().map(PackedRow::len).sum();
        assert_eq!(total, 12);
        for r in &rows {
            assert_eq!(r.seq_lengths.iter().sum::<i32>() as usize, r.len());
            let mut at = 0;
            for &l in &r.seq_lengths {
                assert_eq!(r.position_ids[at], 0);
                assert_eq!(r.labels[at], -100, "first label of a segment is masked");
                for k in 0..l as usize {
                    assert_eq!(r.position_ids[at + k], k as i32);
                }
                at += l as usize;
            }
        }
    }

    #[test]
    fn none_mode_is_one_sample_per_row() {
        let samples = vec![sample(5, 0), sample(3, 1)];
        let rows = pack(&samples, PackMode::None, 8);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].seq_lengths, vec![3]);
    }
}
