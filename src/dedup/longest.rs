//! `dedup --keep longest`: which row of each duplicate cluster stays when the longest one should.
//! Pass 1 shows every conversation to the duplicate index ([`LongestOfCluster::observe`]), which
//! puts each in the cluster of its first-seen representative, and remembers each cluster's longest
//! member (ties: the first); pass 2 asks each conversation's [`Fate`].

use super::{DedupOptions, Deduper, DupKind, Verdict};
use crate::record::Conversation;
use std::collections::HashMap;

/// A conversation's place in its cluster.
#[derive(Debug, Clone)]
struct Member {
    /// The cluster's first-seen row.
    root: String,
    /// How it duplicates the root (None for the root itself), and how closely.
    kind: Option<DupKind>,
    similarity: f64,
}

/// The clusters of pass 1 and their longest members.
pub struct LongestOfCluster {
    deduper: Deduper,
    members: HashMap<String, Member>,
    /// Root id -> (longest member's id, its length).
    longest: HashMap<String, (String, usize)>,
}

/// What pass 2 does with a conversation.
#[derive(Debug, PartialEq)]
pub enum Fate<'a> {
    Keep,
    /// Removed as a duplicate of `of`, its cluster's longest row.
    DuplicateOf {
        of: &'a str,
        kind: DupKind,
        similarity: f64,
    },
}

impl LongestOfCluster {
    pub fn new(opts: DedupOptions) -> Self {
        LongestOfCluster { deduper: Deduper::new(opts), members: HashMap::new(), longest: HashMap::new() }
    }

    /// Pass 1: a batch of conversations, in input order.
    pub fn observe(&mut self, batch: &[Conversation]) {
        for (c, v) in batch.iter().zip(self.deduper.process(batch)) {
            let len = c.full_text().len();
            let member = match v {
                Verdict::Keep => Member { root: c.id.clone(), kind: None, similarity: 1.0 },
                Verdict::Duplicate { of, kind, similarity } => Member { root: of, kind: Some(kind), similarity },
            };
            let best = self.longest.entry(member.root.clone()).or_insert_with(|| (c.id.clone(), len));
            if len > best.1 {
                *best = (c.id.clone(), len);
            }
            self.members.insert(c.id.clone(), member);
        }
    }

    /// Pass 2: whether the conversation `id` stays; None for one pass 1 did not see.
    pub fn fate(&self, id: &str) -> Option<Fate<'_>> {
        let m = self.members.get(id)?;
        let chosen = &self.longest[&m.root].0;
        if chosen == id {
            return Some(Fate::Keep);
        }
        // Similarity is against the cluster's first row; the first row itself reports the chosen one's.
        let (kind, similarity) = match m.kind {
            Some(k) => (k, m.similarity),
            None => {
                let c = &self.members[chosen];
                (c.kind.unwrap_or(DupKind::Near), c.similarity)
            }
        };
        Some(Fate::DuplicateOf { of: chosen, kind, similarity })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Message;

    fn conv(id: &str, text: &str) -> Conversation {
        Conversation::new(id.into(), vec![Message::new("user", "q"), Message::new("assistant", text)])
    }

    #[test]
    fn the_longest_member_stays_and_the_others_point_at_it() {
        let mut l = LongestOfCluster::new(DedupOptions::default());
        let (a, b) = ("the same answer".to_string(), "the same answer".to_string());
        l.observe(&[conv("1", &a), conv("2", "something else"), conv("3", &b)]);
        // Exact duplicates of equal length: the first stays.
        assert_eq!(l.fate("1"), Some(Fate::Keep));
        assert_eq!(l.fate("2"), Some(Fate::Keep));
        assert!(matches!(l.fate("3"), Some(Fate::DuplicateOf { of: "1", kind: DupKind::Exact, .. })));
        assert_eq!(l.fate("4"), None);
    }
}
