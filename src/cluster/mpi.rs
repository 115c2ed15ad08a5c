//! The MPI backend of [`super::World`] (`--features mpi`): Open MPI's world communicator through the
//! `mpi` crate; collectives are called from the main thread only (MPI_THREAD_FUNNELED).

use anyhow::{Context, Result};
use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

/// The MPI environment; dropping it finalizes MPI.
pub struct Session(#[allow(dead_code)] mpi::environment::Universe);

/// MPI initialised: the session, this rank and the world size.
pub fn init() -> Result<(Session, usize, usize)> {
    let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
        .context("MPI could not be initialised (is it already?)")?;
    let w = universe.world();
    Ok((Session(universe), w.rank() as usize, w.size() as usize))
}

pub fn sum_f32(buf: &mut [f32]) -> Result<()> {
    let send = buf.to_vec();
    SimpleCommunicator::world().all_reduce_into(&send[..], buf, SystemOperation::sum());
    Ok(())
}

pub fn sum_f64(buf: &mut [f64]) -> Result<()> {
    let send = buf.to_vec();
    SimpleCommunicator::world().all_reduce_into(&send[..], buf, SystemOperation::sum());
    Ok(())
}

pub fn gather_u64(value: u64, size: usize) -> Result<Vec<u64>> {
    let mut all = vec![0u64; size];
    SimpleCommunicator::world().all_gather_into(&value, &mut all[..]);
    Ok(all)
}

pub fn abort(code: i32) {
    SimpleCommunicator::world().abort(code)
}

pub fn gather_bytes(bytes: &[u8], size: usize) -> Result<Vec<Vec<u8>>> {
    use mpi::datatype::PartitionMut;
    let world = SimpleCommunicator::world();
    let n = mpi::Count::try_from(bytes.len()).context("more than 2 GiB to gather from one rank")?;
    let mut counts = vec![0 as mpi::Count; size];
    world.all_gather_into(&n, &mut counts[..]);
    let displs: Vec<mpi::Count> = counts.iter().scan(0, |at, &c| Some(std::mem::replace(at, *at + c))).collect();
    let mut all = vec![0u8; counts.iter().map(|&c| c as usize).sum()];
    world.all_gather_varcount_into(bytes, &mut PartitionMut::new(&mut all[..], &counts[..], &displs[..]));
    Ok(counts.iter().zip(&displs).map(|(&c, &d)| all[d as usize..(d + c) as usize].to_vec()).collect())
}
