//! Where this process sits in a job, as its launcher says in the environment: torchrun (`RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), Slurm's srun (`SLURM_PROCID`,
//! `SLURM_NTASKS`, `SLURM_LOCALID`, the job's first host), Open MPI's mpirun (`OMPI_COMM_WORLD_*`);
//! and, for data preparation, an array task (`SLURM_ARRAY_TASK_ID` / `SLURM_ARRAY_TASK_COUNT`,
//! Kubernetes' `JOB_COMPLETION_INDEX`). None set: one process, rank 0 of 1.

use anyhow::{bail, Context, Result};

/// The variable `k` as a count, when it is set.
fn number(get: &dyn Fn(&str) -> Option<String>, k: &str) -> Result<Option<usize>> {
    get(k).map(|v| v.trim().parse::<usize>().with_context(|| format!("{k}={v:?} is not a number"))).transpose()
}

/// A training process's place in its job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    /// Which launcher said so ("torchrun", "slurm", "mpirun"), or "none".
    pub launcher: &'static str,
    /// The rendezvous host and port (torchrun's MASTER_ADDR/PORT, Slurm's first node).
    pub master: Option<String>,
}

impl Launch {
    pub const SINGLE: Launch = Launch { rank: 0, world_size: 1, local_rank: 0, launcher: "none", master: None };

    /// From the process environment.
    pub fn from_env() -> Result<Launch> {
        Launch::from_vars(&|k| std::env::var(k).ok())
    }

    /// From `get`, a lookup of environment variables (the process's, or a test's).
    pub fn from_vars(get: &dyn Fn(&str) -> Option<String>) -> Result<Launch> {
        let num = |k: &str| number(get, k);
        let (launcher, rank, size, local) = if let Some(size) = num("WORLD_SIZE")? {
            ("torchrun", num("RANK")?.context("WORLD_SIZE is set but RANK is not")?, size, num("LOCAL_RANK")?)
        } else if let Some(size) = num("OMPI_COMM_WORLD_SIZE")? {
            ("mpirun", num("OMPI_COMM_WORLD_RANK")?.unwrap_or(0), size, num("OMPI_COMM_WORLD_LOCAL_RANK")?)
        } else if let Some(size) = num("SLURM_NTASKS")?.filter(|_| get("SLURM_PROCID").is_some()) {
            ("slurm", num("SLURM_PROCID")?.unwrap_or(0), size, num("SLURM_LOCALID")?)
        } else {
            return Ok(Launch::SINGLE);
        };
        if size == 0 || rank >= size {
            bail!("{launcher} says rank {rank} of a world of {size}: the rank must be below the world size");
        }
        let master = match (get("MASTER_ADDR"), get("MASTER_PORT")) {
            (Some(a), Some(p)) => Some(format!("{a}:{p}")),
            (Some(a), None) => Some(a),
            _ => get("SLURM_JOB_NODELIST").map(|n| first_host(&n)),
        };
        Ok(Launch { rank, world_size: size, local_rank: local.unwrap_or(0), launcher, master })
    }
}

/// The first host of a Slurm node list: "node[03-05,07],gpu1" -> "node03".
pub fn first_host(list: &str) -> String {
    let head = list.split(',').next().unwrap_or(list);
    match head.split_once('[') {
        Some((prefix, rest)) => {
            let first = rest.trim_end_matches(']').split([',', '-']).next().unwrap_or("");
            format!("{prefix}{first}")
        }
        None => head.to_string(),
    }
}

/// A data-preparation task's share: rank `rank` of `world_size` tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    pub rank: usize,
    pub world_size: usize,
}

impl Share {
    /// `--rank`/`--world-size` when given, else a Slurm array task or a Kubernetes indexed job.
    /// Kubernetes says only the index, so its world size comes from `--world-size`.
    pub fn resolve(rank: Option<usize>, world_size: Option<usize>) -> Result<Option<Share>> {
        Share::resolve_with(rank, world_size, &|k| std::env::var(k).ok())
    }

    pub fn resolve_with(
        rank: Option<usize>,
        world_size: Option<usize>,
        get: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<Share>> {
        let num = |k: &str| number(get, k);
        let (rank, size) = match (rank, world_size) {
            (Some(r), Some(w)) => (r, w),
            (None, None) if num("SLURM_ARRAY_TASK_ID")?.is_some() => {
                // Array indices may start anywhere (--array=1-8): rank = id - min.
                let id = num("SLURM_ARRAY_TASK_ID")?.unwrap_or(0);
                let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
                let count = num("SLURM_ARRAY_TASK_COUNT")?
                    .context("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not")?;
                (id.checked_sub(min).context("SLURM_ARRAY_TASK_ID is below SLURM_ARRAY_TASK_MIN")?, count)
            }
            (None, Some(w)) => match num("JOB_COMPLETION_INDEX")? {
                Some(i) => (i, w),
                None => bail!("--world-size {w} needs --rank (or SLURM_ARRAY_TASK_ID, JOB_COMPLETION_INDEX)"),
            },
            (None, None) => return Ok(None),
            (Some(r), None) => bail!("--rank {r} needs --world-size"),
        };
        if size == 0 || rank >= size {
            bail!("rank {rank} of {size} tasks: the rank must be below the world size");
        }
        Ok(Some(Share { rank, world_size: size }))
    }

    /// The part directory of this rank under `out`.
    pub fn dir(&self, out: &std::path::Path) -> std::path::PathBuf {
        out.join(PARTS).join(format!("rank-{:05}-of-{:05}", self.rank, self.world_size))
    }
}

/// The folder of an output directory that holds the ranks' parts.
pub const PARTS: &str = "parts";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::tests::vars;

    #[test]
    fn launchers_are_read_from_their_variables() {
        assert_eq!(Launch::from_vars(&vars(&[])).unwrap(), Launch::SINGLE);
        let t = Launch::from_vars(&vars(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "n1"),
            ("MASTER_PORT", "29500"),
        ]))
        .unwrap();
        assert_eq!((t.rank, t.world_size, t.local_rank, t.launcher), (3, 4, 1, "torchrun"));
        assert_eq!(t.master.as_deref(), Some("n1:29500"));
        let s = Launch::from_vars(&vars(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gpu[07-08,10]"),
        ]))
        .unwrap();
        assert_eq!((s.rank, s.world_size, s.local_rank, s.launcher), (5, 8, 1, "slurm"));
        assert_eq!(s.master.as_deref(), Some("gpu07"));
        assert!(Launch::from_vars(&vars(&[("RANK", "4"), ("WORLD_SIZE", "4")])).is_err());
        assert!(Launch::from_vars(&vars(&[("WORLD_SIZE", "x"), ("RANK", "0")])).is_err());
    }

    #[test]
    fn array_tasks_give_the_data_share() {
        let none = vars(&[]);
        assert_eq!(Share::resolve_with(None, None, &none).unwrap(), None);
        assert_eq!(Share::resolve_with(Some(1), Some(3), &none).unwrap(), Some(Share { rank: 1, world_size: 3 }));
        let slurm =
            vars(&[("SLURM_ARRAY_TASK_ID", "4"), ("SLURM_ARRAY_TASK_MIN", "3"), ("SLURM_ARRAY_TASK_COUNT", "3")]);
        assert_eq!(Share::resolve_with(None, None, &slurm).unwrap(), Some(Share { rank: 1, world_size: 3 }));
        let k8s = vars(&[("JOB_COMPLETION_INDEX", "2")]);
        assert_eq!(Share::resolve_with(None, Some(3), &k8s).unwrap(), Some(Share { rank: 2, world_size: 3 }));
        assert!(Share::resolve_with(Some(3), Some(3), &none).is_err());
        assert!(Share::resolve_with(Some(0), None, &none).is_err());
    }
}
