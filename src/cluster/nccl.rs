//! The NCCL backend of [`super::World`] (`--features nccl`): one communicator per rank on the rank's
//! GPU, its collectives queued on candle's own CUDA stream (the stream the gradients were computed
//! on, so no extra synchronisation between them). The ranks meet through [`super::rendezvous`].
//! Every wait for a collective is watched: a rank whose peer stopped or hangs fails with an error
//! after `TUNEKIT_COLLECTIVE_TIMEOUT` seconds (default 600) instead of waiting for ever.

use super::launch::Launch;
use super::rendezvous::{self, Rendezvous};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream};
use candle_core::cuda_backend::cudarc::nccl::result::{NcclError, NcclStatus};
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The communicator, once the rank's device is known ([`connect`]); taken out (and aborted) by
/// [`abort`].
struct Connection {
    comm: Mutex<Option<Comm>>,
    stream: Arc<CudaStream>,
    ordinal: usize,
}

// SAFETY: the communicator is used under its mutex, one collective at a time, and only through its
// stream; NCCL communicators may be used from any thread that way.
unsafe impl Send for Connection {}
unsafe impl Sync for Connection {}

static CONNECTION: OnceLock<Connection> = OnceLock::new();

/// How long a rank waits for one collective before it gives up on its peers.
fn timeout() -> Duration {
    let s = std::env::var("TUNEKIT_COLLECTIVE_TIMEOUT").ok().and_then(|v| v.parse::<f64>().ok()).unwrap_or(600.0);
    Duration::from_secs_f64(s.max(1.0))
}

/// Makes this rank's communicator on `device` (every rank calls it; it returns when all have
/// joined, or fails after the timeout). A second call on the same GPU is a no-op; on another GPU,
/// an error.
pub fn connect(device: &CudaDevice, launch: &Launch) -> Result<()> {
    let stream = device.cuda_stream();
    let ordinal = stream.context().ordinal();
    if let Some(c) = CONNECTION.get() {
        if c.ordinal != ordinal {
            bail!("this rank's NCCL communicator is on GPU {}, not GPU {ordinal}: use one --device per run", c.ordinal);
        }
        return Ok(());
    }
    let how = Rendezvous::from_vars(&|k| std::env::var(k).ok(), launch.master.as_deref())?;
    let id = unique_id(&how, launch.rank)?;
    // NCCL's init waits for every rank: one that never comes must not hang the others for ever, so
    // it runs on a thread of its own, watched.
    struct Joined(Result<Comm, String>);
    // SAFETY: the communicator is handed over once, whole, and used by the receiver alone.
    unsafe impl Send for Joined {}
    let (tx, rx) = std::sync::mpsc::channel();
    let (s, rank, size) = (stream.clone(), launch.rank, launch.world_size);
    std::thread::spawn(move || {
        // NCCL takes the GPU current on the calling thread: make it this rank's.
        let joined = match s.context().bind_to_thread() {
            Ok(()) => Comm::from_rank(s, rank, size, id).map_err(|e| format!("{e:?}")),
            Err(e) => Err(format!("CUDA: {e:?}")),
        };
        let _ = tx.send(Joined(joined));
    });
    let limit = timeout();
    let comm = match rx.recv_timeout(limit) {
        Ok(Joined(Ok(comm))) => comm,
        Ok(Joined(Err(e))) => bail!(
            "NCCL could not join rank {rank} of {size} on GPU {ordinal} ({e}; rendezvous {how:?}): NCCL_DEBUG=INFO \
             says why (two ranks on one GPU are refused)"
        ),
        Err(_) => bail!(
            "rank {rank} of {size}: not every rank joined NCCL within {} s (TUNEKIT_COLLECTIVE_TIMEOUT): is every \
             rank started, and can each reach rank 0 at {how:?}?",
            limit.as_secs()
        ),
    };
    let _ = CONNECTION.set(Connection { comm: Mutex::new(Some(comm)), stream, ordinal });
    Ok(())
}

/// The job's NCCL unique id, the same on every rank.
fn unique_id(how: &Rendezvous, rank: usize) -> Result<Id> {
    let nccl = |e| anyhow!("NCCL could not make its unique id: {e:?}");
    match how {
        Rendezvous::Address(addr) => {
            // NCCL reads the address itself: every rank's id names it, and rank 0 listens there.
            if std::env::var("NCCL_COMM_ID").ok().as_deref() != Some(addr.as_str()) {
                std::env::set_var("NCCL_COMM_ID", addr);
            }
            Id::new().map_err(nccl)
        }
        Rendezvous::File { path, job } if rank == 0 => {
            let id = Id::new().map_err(nccl)?;
            rendezvous::publish(path, job, &id.internal().map(|c| c as u8))?;
            Ok(id)
        }
        Rendezvous::File { path, job } => {
            let bytes = rendezvous::await_id(path, job, timeout())?;
            let internal: [std::ffi::c_char; 128] = bytes
                .iter()
                .map(|&b| b as std::ffi::c_char)
                .collect::<Vec<_>>()
                .try_into()
                .map_err(|_| anyhow!("{} does not hold a 128-byte NCCL id", path.display()))?;
            Ok(Id::uninit(internal))
        }
    }
}

fn connection() -> Result<&'static Connection> {
    CONNECTION.get().context("the NCCL communicator is made when the model is placed on its GPU, before any collective")
}

impl Connection {
    /// `f` with the communicator, held for the while.
    fn with_comm<T>(&self, f: impl FnOnce(&Comm) -> Result<T>) -> Result<T> {
        let guard = self.comm.lock().map_err(|_| anyhow!("the NCCL communicator's lock is poisoned"))?;
        f(guard.as_ref().context("the NCCL communicator was aborted after an earlier failure")?)
    }

    /// Queues one collective (`f`) on the communicator, then waits (watched) for it.
    fn run(&self, what: &str, f: impl FnOnce(&Comm) -> Result<NcclStatus, NcclError>) -> Result<()> {
        self.with_comm(|comm| f(comm).map_err(nccl_err(what)))?;
        self.wait(what)
    }

    /// Waits for the stream's work so far, failing (and aborting the communicator) after the timeout.
    fn wait(&self, what: &str) -> Result<()> {
        let done = self.stream.record_event(None).map_err(|e| anyhow!("CUDA: {e:?}"))?;
        let (start, limit) = (Instant::now(), timeout());
        let mut spins = 0u32;
        while !done.try_is_complete().map_err(|e| anyhow!("CUDA failed during {what}: {e:?}"))? {
            if start.elapsed() > limit {
                abort();
                bail!(
                    "{what} did not finish within {} s (TUNEKIT_COLLECTIVE_TIMEOUT): another rank has stopped or hangs",
                    limit.as_secs()
                );
            }
            spins += 1;
            if spins < 2000 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        Ok(())
    }
}

fn nccl_err(what: &str) -> impl Fn(NcclError) -> anyhow::Error + '_ {
    move |e| anyhow!("NCCL failed during {what}: {e:?} (NCCL_DEBUG=INFO says more)")
}

fn cuda_err(e: candle_core::cuda_backend::cudarc::driver::DriverError) -> anyhow::Error {
    anyhow!("CUDA: {e:?}")
}

/// A device buffer's values, copied back once the stream has finished with them.
fn to_host<T: candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
    c: &Connection,
    dev: &CudaSlice<T>,
) -> Result<Vec<T>> {
    let v = c.stream.clone_dtoh(dev).map_err(cuda_err)?;
    c.stream.synchronize().map_err(cuda_err)?;
    Ok(v)
}

/// Element-wise sum over the ranks of host values, through the GPU.
fn sum_host<T>(buf: &mut [T], what: &str) -> Result<()>
where
    T: candle_core::cuda_backend::cudarc::driver::DeviceRepr
        + candle_core::cuda_backend::cudarc::nccl::safe::NcclType
        + Copy,
{
    let c = connection()?;
    let mut dev: CudaSlice<T> = c.stream.clone_htod(buf).map_err(cuda_err)?;
    c.run(what, |comm| comm.all_reduce_in_place(&mut dev, &ReduceOp::Sum))?;
    buf.copy_from_slice(&to_host(c, &dev)?);
    Ok(())
}

pub fn sum_f32(buf: &mut [f32]) -> Result<()> {
    sum_host(buf, "a sum over the ranks")
}

pub fn sum_f64(buf: &mut [f64]) -> Result<()> {
    sum_host(buf, "a sum over the ranks")
}

/// Every rank's `value`, by rank.
pub fn gather_u64(value: u64, size: usize) -> Result<Vec<u64>> {
    let c = connection()?;
    let send = c.stream.clone_htod(&[value]).map_err(cuda_err)?;
    let mut all = c.stream.alloc_zeros::<u64>(size).map_err(cuda_err)?;
    c.run("a gather from the ranks", |comm| comm.all_gather(&send, &mut all))?;
    to_host(c, &all)
}

/// Every rank's `bytes`, by rank (padded to the longest, then cut back).
pub fn gather_bytes(bytes: &[u8], size: usize) -> Result<Vec<Vec<u8>>> {
    let lens = gather_u64(bytes.len() as u64, size)?;
    let longest = lens.iter().copied().max().unwrap_or(0).max(1) as usize;
    let c = connection()?;
    let mut padded = bytes.to_vec();
    padded.resize(longest, 0);
    let send = c.stream.clone_htod(&padded).map_err(cuda_err)?;
    let mut all = c.stream.alloc_zeros::<u8>(longest * size).map_err(cuda_err)?;
    c.run("a gather from the ranks", |comm| comm.all_gather(&send, &mut all))?;
    let all = to_host(c, &all)?;
    Ok(lens.iter().enumerate().map(|(r, &n)| all[r * longest..r * longest + n as usize].to_vec()).collect())
}

/// The element-wise sum over the ranks of an f32 tensor on this rank's GPU, computed there, and the
/// seconds of the all-reduce alone (the stream's earlier work finished first).
pub fn sum_tensor(t: &Tensor) -> Result<(Tensor, f64)> {
    let c = connection()?;
    let t = t.contiguous()?;
    c.stream.synchronize().map_err(cuda_err)?;
    let start = Instant::now();
    let out = t.apply_op1_no_bwd(&AllReduce)?;
    c.wait("the gradient all-reduce")?;
    Ok((out, start.elapsed().as_secs_f64()))
}

/// NCCL's all-reduce as a candle op, so the sum lands in a tensor of candle's on the same stream.
struct AllReduce;

impl CustomOp1 for AllReduce {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the NCCL all-reduce sums tensors on a GPU; this one is on the CPU")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let fail = |e: anyhow::Error| candle_core::Error::Msg(format!("{e:#}"));
        let (start, end) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("not contiguous".into()))?;
        let src = s.as_cuda_slice::<f32>()?.slice(start..end);
        // SAFETY: the all-reduce writes every element of `dst` before anything reads it.
        let mut dst = unsafe { s.device.alloc::<f32>(end - start) }?;
        let what = "the gradient all-reduce";
        connection()
            .and_then(|c| c.with_comm(|comm| comm.all_reduce(&src, &mut dst, &ReduceOp::Sum).map_err(nccl_err(what))))
            .map_err(fail)?;
        Ok((CudaStorage::wrap_cuda_slice(dst, s.device.clone()), l.shape().clone()))
    }
}

/// Aborts the communicator (NCCL stops its kernels and closes its connections, so the peers' own
/// waits fail rather than hang).
pub fn abort() {
    if let Some(c) = CONNECTION.get() {
        if let Ok(mut guard) = c.comm.try_lock() {
            drop(guard.take()); // cudarc's Comm aborts on drop
        }
    }
}
