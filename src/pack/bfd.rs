//! Best-fit-decreasing bin packing of samples into rows of at most `capacity` tokens.
//! Samples are never split. Deterministic: ties are broken by input order.

use std::collections::BTreeMap;

/// Returns bins as lists of item indices. Every length must be `<= capacity`.
pub fn best_fit_decreasing(lengths: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
    let mut bins: Vec<(Vec<usize>, usize)> = Vec::new(); // (items, remaining)
                                                         // remaining capacity -> bins with exactly that much room (lowest index first)
    let mut by_room: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for i in order {
        let len = lengths[i];
        debug_assert!(len <= capacity);
        let fit = by_room.range(len..).next().map(|(&room, ids)| (room, ids[0]));
        let bin = match fit {
            Some((room, b)) => {
                let ids = by_room.get_mut(&room).expect("present");
                ids.remove(0);
                if ids.is_empty() {
                    by_room.remove(&room);
                }
                b
            }
            None => {
                bins.push((Vec::new(), capacity));
                bins.len() - 1
            }
        };
        bins[bin].0.push(i);
        bins[bin].1 -= len;
        let room = bins[bin].1;
        if room > 0 {
            let v = by_room.entry(room).or_default();
            let pos = v.partition_point(|&x| x < bin);
            v.insert(pos, bin);
        }
    }
    bins.into_iter().map(|(items, _)| items).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_without_splitting_and_fills_well() {
        let lengths = [5, 4, 3, 3, 2, 2, 1, 7, 6];
        let bins = best_fit_decreasing(&lengths, 8);
        let mut seen: Vec<usize> = bins.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
        for b in &bins {
            assert!(b.iter().map(|&i| lengths[i]).sum::<usize>() <= 8);
        }
        // 33 tokens need at least 5 bins of 8; BFD reaches it here.
        assert_eq!(bins.len(), 5);
    }

    #[test]
    fn deterministic() {
        let lengths: Vec<usize> = (0..500).map(|i| (i * 37 % 101) + 1).collect();
        assert_eq!(best_fit_decreasing(&lengths, 128), best_fit_decreasing(&lengths, 128));
    }
}
