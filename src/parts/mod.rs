//! Sharded data preparation. A task of a cluster job (`prepare --rank R --world-size W`, or a Slurm
//! array task, or a Kubernetes indexed job) maps and tokenizes every W-th batch of 4,096 input rows
//! and writes what it found for each row into its part, `OUT/parts/rank-R-of-W/`: the row as read
//! (a reject, a filtered row, a contaminated row, or a conversation with its duplicate signature
//! and its tokenized sample, unless it duplicates an earlier row of the rank's share). `tunekit
//! merge-parts OUT` then replays the parts in the global input order through the one-process
//! prepare's sequential half (counting, near-duplicate decisions, train/eval split, packing,
//! shards), so it writes exactly what one process would have. [`block`] is a part's record of one
//! batch; [`part`] a part on disk; [`set_aside`] the rows a rank does not tokenize.

pub mod block;
pub mod part;
pub mod set_aside;
