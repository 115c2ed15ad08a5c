//! How the ranks of a GPU job find each other without a server of tunekit's own: NCCL's bootstrap
//! root is rank 0, at an address every rank knows in advance (`NCCL_COMM_ID=host:port`, by default
//! the launcher's rendezvous host with the port after torchrun's own, which its agent already
//! listens on), or rank 0's unique id handed over in a file on shared storage
//! (`TUNEKIT_NCCL_ID_FILE`), tagged with the job so a file left by an earlier job is never read.

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::time::{Duration, Instant};

/// How the ranks agree on the unique id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rendezvous {
    /// Every rank derives the id from this `host:port` (NCCL_COMM_ID); rank 0 listens there.
    Address(String),
    /// Rank 0 writes its id to this file, tagged with `job`; the others wait for it.
    File { path: std::path::PathBuf, job: String },
}

/// The Slurm step's default port when none is given: one per job, so two jobs sharing a node do
/// not collide, above the range torchrun uses (29500).
fn slurm_port(job: usize) -> u16 {
    (30000 + job % 20000) as u16
}

impl Rendezvous {
    /// From the environment (`get`) and the launcher's rendezvous host (`master`: `host:port`, or
    /// Slurm's first host alone).
    pub fn from_vars(get: &dyn Fn(&str) -> Option<String>, master: Option<&str>) -> Result<Rendezvous> {
        if let Some(path) = get("TUNEKIT_NCCL_ID_FILE").filter(|p| !p.is_empty()) {
            let job = ["TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "TUNEKIT_JOB_ID"]
                .iter()
                .find_map(|k| get(k).filter(|v| !v.is_empty()).map(|v| format!("{k}={v}")))
                .context(
                    "TUNEKIT_NCCL_ID_FILE needs a job id to tell this job's file from an earlier one's: \
                     run under torchrun or Slurm, or set TUNEKIT_JOB_ID to a value unique to this run",
                )?;
            let job = match get("SLURM_STEP_ID") {
                Some(step) if job.starts_with("SLURM_JOB_ID") => format!("{job}.{step}"),
                _ => job,
            };
            return Ok(Rendezvous::File { path: path.into(), job });
        }
        if let Some(addr) = get("NCCL_COMM_ID").filter(|a| !a.is_empty()) {
            return Ok(Rendezvous::Address(addr));
        }
        match master.map(|m| m.rsplit_once(':').map(|(h, p)| (h.to_string(), p.parse::<u16>()))) {
            Some(Some((host, Ok(port)))) => {
                let next = port.checked_add(1).context("MASTER_PORT is 65535: set NCCL_COMM_ID=HOST:PORT")?;
                Ok(Rendezvous::Address(format!("{host}:{next}")))
            }
            Some(Some((_, Err(_)))) => bail!("MASTER_PORT in {:?} is not a port number", master.unwrap_or("")),
            Some(None) => {
                let job = get("SLURM_JOB_ID").and_then(|j| j.parse::<usize>().ok()).unwrap_or(0);
                Ok(Rendezvous::Address(format!("{}:{}", master.unwrap_or(""), slurm_port(job))))
            }
            None => bail!(
                "the ranks cannot find each other: set NCCL_COMM_ID=HOST:PORT (rank 0's host and a free port), \
                 MASTER_ADDR and MASTER_PORT (torchrun sets them), or TUNEKIT_NCCL_ID_FILE=/shared/path"
            ),
        }
    }
}

/// Rank 0's side of a file rendezvous: `id` written whole (a temporary file renamed into place).
pub fn publish(path: &Path, job: &str, id: &[u8]) -> Result<()> {
    let text = format!("{job}\n{}\n", hex(id));
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, text).with_context(|| format!("cannot write the NCCL id to {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move the NCCL id into {}", path.display()))?;
    Ok(())
}

/// The other ranks' side: waits up to `timeout` for rank 0's file of this `job`.
pub fn await_id(path: &Path, job: &str, timeout: Duration) -> Result<Vec<u8>> {
    let start = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            let mut lines = text.lines();
            if lines.next() == Some(job) {
                if let Some(id) = lines.next().and_then(unhex) {
                    return Ok(id);
                }
            }
        }
        if start.elapsed() >= timeout {
            bail!(
                "rank 0 did not publish its NCCL id for {job} in {} within {} s: is rank 0 running, and is the \
                 path on storage every node shares?",
                path.display(),
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::tests::vars;

    #[test]
    fn the_address_comes_from_nccl_comm_id_or_the_port_after_torchruns() {
        let r = Rendezvous::from_vars(&vars(&[("NCCL_COMM_ID", "10.0.0.5:4242")]), Some("node1:29500")).unwrap();
        assert_eq!(r, Rendezvous::Address("10.0.0.5:4242".into()));
        let r = Rendezvous::from_vars(&vars(&[]), Some("node1:29500")).unwrap();
        assert_eq!(r, Rendezvous::Address("node1:29501".into()));
        let r = Rendezvous::from_vars(&vars(&[("SLURM_JOB_ID", "123456")]), Some("gpu03")).unwrap();
        assert_eq!(r, Rendezvous::Address("gpu03:33456".into()));
        let e = Rendezvous::from_vars(&vars(&[]), None).unwrap_err().to_string();
        assert!(e.contains("NCCL_COMM_ID=HOST:PORT"), "{e}");
        assert!(Rendezvous::from_vars(&vars(&[]), Some("h:port")).is_err());
    }

    #[test]
    fn a_file_rendezvous_is_tagged_with_the_job() {
        let r = Rendezvous::from_vars(
            &vars(&[("TUNEKIT_NCCL_ID_FILE", "/shared/id"), ("SLURM_JOB_ID", "7"), ("SLURM_STEP_ID", "0")]),
            Some("gpu03"),
        )
        .unwrap();
        assert_eq!(r, Rendezvous::File { path: "/shared/id".into(), job: "SLURM_JOB_ID=7.0".into() });
        let e = Rendezvous::from_vars(&vars(&[("TUNEKIT_NCCL_ID_FILE", "/shared/id")]), None).unwrap_err();
        assert!(e.to_string().contains("TUNEKIT_JOB_ID"), "{e}");
    }

    #[test]
    fn ranks_read_rank_zeros_id_and_never_an_earlier_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nccl-id");
        let id: Vec<u8> = (0..128u8).map(|i| i.wrapping_mul(37)).collect();
        publish(&path, "TUNEKIT_JOB_ID=old", &[9; 128]).unwrap();
        // The earlier job's file is not taken for this job's: the wait runs out.
        let e = await_id(&path, "TUNEKIT_JOB_ID=new", Duration::from_millis(300)).unwrap_err().to_string();
        assert!(e.contains("did not publish") && e.contains("TUNEKIT_JOB_ID=new"), "{e}");
        // Rank 0 publishes while another rank waits.
        let (p, want) = (path.clone(), id.clone());
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            publish(&p, "TUNEKIT_JOB_ID=new", &want).unwrap();
        });
        assert_eq!(await_id(&path, "TUNEKIT_JOB_ID=new", Duration::from_secs(10)).unwrap(), id);
        writer.join().unwrap();
        assert!(std::fs::read_dir(dir.path()).unwrap().count() == 1, "no temporary file is left behind");
    }
}
