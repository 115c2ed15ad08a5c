//! The processes of one job and what they do together. [`launch`] reads where this process sits
//! from its launcher's environment (training under torchrun, srun or mpirun; data preparation as an
//! array task). [`World`] is the data-parallel group a training run joins: one process by default,
//! every rank of an `mpirun`/`srun` job on CPUs (`--features mpi`), or every rank of a `torchrun`/
//! `srun` job on GPUs (`--features nccl`), with the collectives the trainer needs (sums of gradients
//! and counts, a gather to check the ranks agree).

pub mod launch;
#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
mod nccl;
pub mod rendezvous;

use anyhow::{bail, Result};
use launch::Launch;
use std::sync::OnceLock;

/// This process's data-parallel group.
#[derive(Debug)]
pub struct World {
    pub rank: usize,
    pub size: usize,
    pub launch: Launch,
    /// "single", "mpi" or "nccl".
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

/// The backend a job of more than one rank uses: `TUNEKIT_BACKEND` (mpi or nccl) when set; else
/// MPI under mpirun, NCCL under torchrun, and under srun NCCL when this build has it.
pub fn backend_for(launch: &Launch, wanted: Option<&str>) -> Result<&'static str> {
    let (mpi, nccl) = (cfg!(feature = "mpi"), cfg!(feature = "nccl"));
    let missing = |b: &str, feature: &str| {
        anyhow::anyhow!(
            "{} started {} ranks for the {b} backend, but this tunekit was built without it: rebuild with \
             `--features {feature}` ({})",
            launch.launcher,
            launch.world_size,
            if feature == "mpi" {
                "CPU, Open MPI; launch with mpirun or srun"
            } else {
                "GPU; launch with torchrun or srun"
            }
        )
    };
    match wanted.unwrap_or("") {
        "mpi" => return if mpi { Ok("mpi") } else { Err(missing("MPI", "mpi")) },
        "nccl" => return if nccl { Ok("nccl") } else { Err(missing("NCCL", "nccl")) },
        "" => {}
        other => bail!("TUNEKIT_BACKEND={other}: use mpi (CPUs) or nccl (GPUs)"),
    }
    Ok(match launch.launcher {
        "mpirun" if mpi => "mpi",
        "torchrun" if nccl => "nccl",
        "torchrun" => bail!(
            "torchrun started {} ranks, but this tunekit has no NCCL backend: rebuild with `--features nccl` \
             (GPU), or launch CPU ranks with mpirun (`--features mpi`)",
            launch.world_size
        ),
        _ if nccl => "nccl",
        _ if mpi => "mpi",
        _ => bail!(
            "{} started {} ranks, but this tunekit has no data-parallel backend: build it with `--features mpi` \
             (CPU, Open MPI; launch with mpirun or srun) or `--features nccl` (GPU; torchrun or srun)",
            launch.launcher,
            launch.world_size
        ),
    })
}

/// Joins the group the launcher started: with one process (no launcher, or a world of 1) nothing
/// is joined; with more, the MPI world (`--features mpi`), which must agree with the launcher, or
/// the NCCL group (`--features nccl`), whose communicator is made when the model is placed on the
/// rank's GPU ([`World::attach`]).
pub fn join() -> Result<Membership> {
    let launch = Launch::from_env()?;
    let wanted = std::env::var("TUNEKIT_BACKEND").ok().filter(|b| !b.is_empty());
    let backend = match (launch.world_size, wanted.as_deref()) {
        (1, None) => "single",
        // TUNEKIT_BACKEND=nccl with one rank runs the backend's code path alone (a check of it).
        (_, wanted) => backend_for(&launch, wanted)?,
    };
    #[cfg(feature = "mpi")]
    if backend == "mpi" {
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
    if backend == "nccl" {
        // The communicator waits for the rank's GPU (World::attach).
        let _ = WORLD.set(World { rank: launch.rank, size: launch.world_size, launch, backend });
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

    /// Whether steps are summed through a backend (more than one rank, or one asked for by name).
    pub fn distributed(&self) -> bool {
        self.backend != "single"
    }

    /// Readies the group for the device the model was placed on: for NCCL, makes this rank's
    /// communicator on that GPU (every rank must call it); nothing for the other backends.
    pub fn attach(&self, device: &candle_core::Device) -> Result<()> {
        if self.backend != "nccl" {
            return Ok(());
        }
        match device {
            #[cfg(feature = "nccl")]
            candle_core::Device::Cuda(d) => nccl::connect(d, &self.launch),
            _ => bail!(
                "the NCCL backend trains on GPUs, but this rank's model is on the CPU: leave --device at auto \
                 (each rank takes the GPU of its LOCAL_RANK), or train on CPUs with mpirun (`--features mpi`)"
            ),
        }
    }

    /// Element-wise sum over the ranks, in place on every rank.
    pub fn sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        let _ = &buf; // one rank: the sum is the buffer
        match self.backend {
            #[cfg(feature = "mpi")]
            "mpi" => mpi::sum_f32(buf),
            #[cfg(feature = "nccl")]
            "nccl" => nccl::sum_f32(buf),
            _ => Ok(()),
        }
    }

    /// Element-wise sum over the ranks of counts and losses, in place on every rank.
    pub fn sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let _ = &buf; // one rank: the sum is the buffer
        match self.backend {
            #[cfg(feature = "mpi")]
            "mpi" => mpi::sum_f64(buf),
            #[cfg(feature = "nccl")]
            "nccl" => nccl::sum_f64(buf),
            _ => Ok(()),
        }
    }

    /// The element-wise sum over the ranks of an f32 tensor (the step's gradients, flat): on the GPU
    /// with NCCL, through host memory with MPI. Also the seconds of the collective itself (not the
    /// copies around it, nor work still queued before it on the GPU).
    pub fn sum_tensor(&self, t: &candle_core::Tensor) -> Result<(candle_core::Tensor, f64)> {
        match self.backend {
            #[cfg(feature = "nccl")]
            "nccl" => nccl::sum_tensor(t),
            "single" => Ok((t.clone(), 0.0)),
            _ => {
                let mut flat = t.flatten_all()?.to_vec1::<f32>()?;
                let start = std::time::Instant::now();
                self.sum_f32(&mut flat)?;
                let seconds = start.elapsed().as_secs_f64();
                Ok((candle_core::Tensor::from_vec(flat, t.dims(), t.device())?, seconds))
            }
        }
    }

    /// Every rank's `value`, by rank.
    pub fn gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        match self.backend {
            #[cfg(feature = "mpi")]
            "mpi" => mpi::gather_u64(value, self.size),
            #[cfg(feature = "nccl")]
            "nccl" => nccl::gather_u64(value, self.size),
            _ => Ok(vec![value]),
        }
    }

    /// Every rank's `bytes`, by rank.
    pub fn gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        match self.backend {
            #[cfg(feature = "mpi")]
            "mpi" => mpi::gather_bytes(bytes, self.size),
            #[cfg(feature = "nccl")]
            "nccl" => nccl::gather_bytes(bytes, self.size),
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

    /// A rank that failed does not leave the others waiting in a collective: with MPI every rank
    /// stops with `code` (MPI_Abort); with NCCL this rank's communicator is aborted, so its peers'
    /// collectives fail (and the launcher, seeing this rank exit, stops the rest).
    pub fn abort(&self, code: i32) {
        #[cfg(feature = "mpi")]
        if self.backend == "mpi" {
            mpi::abort(code);
        }
        #[cfg(feature = "nccl")]
        if self.backend == "nccl" {
            nccl::abort();
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A lookup of environment variables from `pairs`, for the launch and rendezvous tests.
    pub(crate) fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: std::collections::HashMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    fn launched(launcher: &'static str) -> Launch {
        Launch { rank: 0, world_size: 2, local_rank: 0, launcher, master: None }
    }

    #[test]
    fn each_launcher_gets_the_backend_its_build_has_or_a_message_naming_the_feature() {
        let (mpi, nccl) = (cfg!(feature = "mpi"), cfg!(feature = "nccl"));
        for l in ["mpirun", "torchrun", "slurm"] {
            let got = backend_for(&launched(l), None);
            match (l, mpi, nccl) {
                ("mpirun", true, _) => assert_eq!(got.unwrap(), "mpi"),
                ("torchrun", _, true) | (_, _, true) => assert_eq!(got.unwrap(), "nccl"),
                ("torchrun", _, false) => {
                    assert!(got.unwrap_err().to_string().contains("--features nccl"), "{l}")
                }
                (_, true, false) => assert_eq!(got.unwrap(), "mpi"),
                _ => assert!(got.unwrap_err().to_string().contains("--features mpi"), "{l}"),
            }
        }
        let named = backend_for(&launched("slurm"), Some("nccl"));
        assert_eq!(named.is_ok(), nccl, "{named:?}");
        if !nccl {
            assert!(named.unwrap_err().to_string().contains("rebuild with `--features nccl`"));
        }
        let e = backend_for(&launched("slurm"), Some("gloo")).unwrap_err().to_string();
        assert!(e.contains("use mpi (CPUs) or nccl (GPUs)"), "{e}");
    }
}
