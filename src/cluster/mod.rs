//! The processes of one job and what they do together. [`launch`] reads where this process sits
//! from its launcher's environment (training under torchrun, srun or mpirun; data preparation as an
//! array task). [`World`] is the data-parallel group a training run joins: one process by default,
//! or every rank of an `mpirun`/`srun` job when built with `--features mpi`, with the collectives
//! the trainer needs (sums of gradients and counts, a gather to check the ranks agree).

pub mod launch;
#[cfg(feature = "mpi")]
mod mpi;

use anyhow::{bail, Result};
use launch::Launch;
use std::sync::OnceLock;

/// This process's data-parallel group.
#[derive(Debug)]
pub struct World {
    pub rank: usize,
    pub size: usize,
    pub launch: Launch,
    /// "single" or "mpi".
    pub backend: &'static str,
}

static WORLD: OnceLock<World> = OnceLock::new();
static SINGLE: World = World { rank: 0, size: 1, launch: Launch::SINGLE, backend: "single" };

/// The group this process joined with [`join`]; one process of one otherwise.
pub fn world() -> &'static World {
    WORLD.get().unwrap_or(&SINGLE)
}

/// Held while the process is in the group; dropping it leaves (MPI_Finalize).
pub struct Membership {
    #[cfg(feature = "mpi")]
    _mpi: Option<mpi::Session>,
}

/// Joins the group the launcher started: with one process (no launcher, or a world of 1) nothing
/// is joined; with more, the MPI world (`--features mpi`), which must agree with the launcher.
pub fn join() -> Result<Membership> {
    let launch = Launch::from_env()?;
    #[cfg(feature = "mpi")]
    if launch.world_size > 1 {
        let (session, rank, size) = mpi::init()?;
        if (rank, size) != (launch.rank, launch.world_size) {
            bail!(
                "{} says rank {} of {}, but MPI says rank {rank} of {size}: start the ranks with mpirun or srun \
                 (torchrun does not start an MPI job)",
                launch.launcher,
                launch.rank,
                launch.world_size
            );
        }
        let _ = WORLD.set(World { rank, size, launch, backend: "mpi" });
        return Ok(Membership { _mpi: Some(session) });
    }
    if launch.world_size > 1 {
        bail!(
            "{} started {} ranks, but this tunekit has no data-parallel backend: build it with `--features mpi` \
             (CPU, Open MPI) and launch with mpirun or srun",
            launch.launcher,
            launch.world_size
        );
    }
    Ok(Membership {
        #[cfg(feature = "mpi")]
        _mpi: None,
    })
}

impl World {
    /// Rank 0 writes what the run leaves behind (metrics, checkpoints, the adapter).
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Element-wise sum over the ranks, in place on every rank.
    pub fn sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        #[cfg(feature = "mpi")]
        if self.backend == "mpi" {
            return mpi::sum_f32(buf);
        }
        let _ = buf; // one rank: the sum is the buffer
        Ok(())
    }

    /// Element-wise sum over the ranks of counts and losses, in place on every rank.
    pub fn sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        #[cfg(feature = "mpi")]
        if self.backend == "mpi" {
            return mpi::sum_f64(buf);
        }
        let _ = buf; // one rank: the sum is the buffer
        Ok(())
    }

    /// Every rank's `value`, by rank.
    pub fn gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        match self.backend {
            #[cfg(feature = "mpi")]
            "mpi" => mpi::gather_u64(value, self.size),
            _ => Ok(vec![value]),
        }
    }

    /// Every rank's `bytes`, by rank.
    pub fn gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        match self.backend {
            #[cfg(feature = "mpi")]
            "mpi" => mpi::gather_bytes(bytes, self.size),
            _ => Ok(vec![bytes.to_vec()]),
        }
    }

    /// This rank's share of work dealt round-robin: every `size`-th item from its rank, with its index.
    pub fn share<'a, T>(&self, items: &'a [T]) -> impl Iterator<Item = (usize, &'a T)> {
        items.iter().enumerate().skip(self.rank).step_by(self.size)
    }

    /// Every rank's `value`, by rank (sent as JSON, so floats come back bit for bit).
    pub fn gather<T: serde::Serialize + serde::de::DeserializeOwned>(&self, value: T) -> Result<Vec<T>> {
        if self.size == 1 {
            return Ok(vec![value]);
        }
        let all = self.gather_bytes(&serde_json::to_vec(&value)?)?;
        all.iter().map(|b| Ok(serde_json::from_slice(b)?)).collect()
    }

    /// Every rank stops with `code` (MPI_Abort): a rank that failed does not leave the others
    /// waiting in a collective.
    pub fn abort(&self, code: i32) {
        #[cfg(feature = "mpi")]
        if self.backend == "mpi" {
            mpi::abort(code);
        }
        let _ = code;
    }

    /// Fails on every rank unless all ranks hold the same `digest` (of their options and data),
    /// naming the ranks that differ from rank 0.
    pub fn check_same(&self, digest: u64, what: &str) -> Result<()> {
        let all = self.gather_u64(digest)?;
        let differ: Vec<String> =
            all.iter().enumerate().filter(|(_, d)| **d != all[0]).map(|(r, _)| r.to_string()).collect();
        if !differ.is_empty() {
            bail!(
                "rank(s) {} of {} run with other {what} than rank 0: start every rank with the same command and data",
                differ.join(", "),
                self.size
            );
        }
        Ok(())
    }
}
