//! [`Collective`] over MPI (rsmpi), and over NCCL on CUDA with the `nccl` feature.

use super::{Collective, Shard};
use crate::Error;
use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::Threading;
use std::any::Any;
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Exit status of a rank that ends the job: a peer timed out, or this rank failed.
const EXIT_FAILED: i32 = 3;

/// The processes `mpirun` started, as a data-parallel group.
///
/// [`MpiGroup::init`] starts MPI and installs the two guards that keep a failure from hanging
/// the job: a panic on this rank exits the process at once (an unwinding panic would run
/// `MPI_Finalize` while the other ranks wait in a collective, forever), and a watchdog thread
/// ends the process when a collective waits longer than the timeout. Either way `mpirun` sees
/// a rank leave without finalising and ends the others. Call [`finish`](Self::finish) once the
/// run succeeded; a group dropped without it (an error on the way out) does not finalise, for
/// the same reason.
pub struct MpiGroup {
    universe: RefCell<Option<Universe>>,
    world: SimpleCommunicator,
    shard: Shard,
    watch: Arc<Watch>,
    #[cfg(feature = "nccl")]
    nccl: RefCell<Option<cudarc::nccl::safe::Comm>>,
}

impl std::fmt::Debug for MpiGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiGroup")
            .field("shard", &self.shard)
            .finish()
    }
}

/// What the watchdog watches: since when this rank waits in which collective.
struct Watch {
    waiting: Mutex<Option<(Instant, String)>>,
    step: AtomicUsize,
    timeout: Duration,
    rank: usize,
    world: usize,
}

impl Watch {
    fn enter(&self, what: &str) -> Waiting<'_> {
        if let Ok(mut w) = self.waiting.lock() {
            *w = Some((Instant::now(), what.to_string()));
        }
        Waiting(self)
    }

    fn run(self: Arc<Self>) {
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let late = match self.waiting.lock() {
                Ok(w) => w
                    .as_ref()
                    .filter(|(since, _)| since.elapsed() > self.timeout)
                    .map(|(_, what)| what.clone()),
                Err(_) => None,
            };
            if let Some(what) = late {
                eprintln!(
                    "error: rank {} of {}: waited {} s in {what} at step {} for the other ranks; \
                     one of them has stopped or hangs. Ending the job (if a step or an \
                     evaluation really takes that long, raise --dist-timeout).",
                    self.rank,
                    self.world,
                    self.timeout.as_secs_f64(),
                    self.step.load(Ordering::SeqCst),
                );
                // Leaving without MPI_Finalize is what makes mpirun end the other ranks.
                std::process::exit(EXIT_FAILED);
            }
        }
    }
}

/// Clears the watch when a collective returns.
struct Waiting<'a>(&'a Watch);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Ok(mut w) = self.0.waiting.lock() {
            *w = None;
        }
    }
}

impl MpiGroup {
    /// Starts MPI in this process (one of the processes `mpirun -np N` started; a process
    /// started without `mpirun` is a group of one) with collectives that give up after
    /// `timeout`.
    pub fn init(timeout: Duration) -> Result<Self, Error> {
        let (universe, _) =
            mpi::initialize_with_threading(Threading::Funneled).ok_or_else(|| {
                Error::Distributed("MPI is already initialised in this process".into())
            })?;
        let world = universe.world();
        let shard = Shard {
            rank: world.rank() as usize,
            world: world.size() as usize,
        };
        let watch = Arc::new(Watch {
            waiting: Mutex::new(None),
            step: AtomicUsize::new(0),
            timeout,
            rank: shard.rank,
            world: shard.world,
        });
        let w = watch.clone();
        std::thread::Builder::new()
            .name("mpi-watchdog".into())
            .spawn(move || w.run())
            .map_err(|e| Error::Distributed(format!("cannot start the watchdog thread: {e}")))?;
        let previous = std::panic::take_hook();
        let rank = shard.rank;
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            eprintln!("error: rank {rank} panicked; ending the job");
            std::process::exit(EXIT_FAILED);
        }));
        Ok(MpiGroup {
            universe: RefCell::new(Some(universe)),
            world,
            shard,
            watch,
            #[cfg(feature = "nccl")]
            nccl: RefCell::new(None),
        })
    }

    /// Waits for every rank to get here, then shuts MPI down: the end of a successful run.
    pub fn finish(&self) {
        {
            let _w = self.watch.enter("the final barrier");
            self.world.barrier();
        }
        // Dropping the universe calls MPI_Finalize.
        drop(self.universe.borrow_mut().take());
    }

    /// Ends the whole job now with `code` (`MPI_Abort`): what a rank that failed on its own
    /// calls, so that the others stop at once instead of at their next timeout.
    pub fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}

impl Drop for MpiGroup {
    fn drop(&mut self) {
        // Without `finish` the run failed on this rank: finalising would leave the other ranks
        // in their collective (see the type's documentation).
        if let Some(u) = self.universe.get_mut().take() {
            std::mem::forget(u);
        }
    }
}

impl Collective for MpiGroup {
    fn shard(&self) -> Shard {
        self.shard
    }

    fn engine(&self) -> String {
        let version = mpi::environment::library_version().unwrap_or_default();
        let first = version
            .split(',')
            .next()
            .unwrap_or("MPI")
            .trim()
            .to_string();
        if cfg!(feature = "nccl") && self.shard.world > 1 {
            format!("NCCL on the GPUs, {first} between processes")
        } else {
            first
        }
    }

    fn all_reduce_sum_f32(&self, send: &[f32], sum: &mut [f32], what: &str) -> Result<(), Error> {
        let _w = self.watch.enter(what);
        self.world
            .all_reduce_into(send, sum, SystemOperation::sum());
        Ok(())
    }

    fn all_reduce_sum_f64(&self, send: &[f64], sum: &mut [f64], what: &str) -> Result<(), Error> {
        let _w = self.watch.enter(what);
        self.world
            .all_reduce_into(send, sum, SystemOperation::sum());
        Ok(())
    }

    fn all_gather_f32(&self, send: &[f32], all: &mut [f32], what: &str) -> Result<(), Error> {
        let _w = self.watch.enter(what);
        self.world.all_gather_into(send, all);
        Ok(())
    }

    fn all_gather_f64(&self, send: &[f64], all: &mut [f64], what: &str) -> Result<(), Error> {
        let _w = self.watch.enter(what);
        self.world.all_gather_into(send, all);
        Ok(())
    }

    fn broadcast_f32(&self, buf: &mut [f32], what: &str) -> Result<(), Error> {
        let _w = self.watch.enter(what);
        self.world.process_at_rank(0).broadcast_into(buf);
        Ok(())
    }

    fn broadcast_f64(&self, buf: &mut [f64], what: &str) -> Result<(), Error> {
        let _w = self.watch.enter(what);
        self.world.process_at_rank(0).broadcast_into(buf);
        Ok(())
    }

    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, what: &str) -> Result<(), Error> {
        let _w = self.watch.enter(what);
        let root = self.world.process_at_rank(0);
        let mut len = bytes.len() as u64;
        root.broadcast_into(&mut len);
        bytes.resize(len as usize, 0);
        root.broadcast_into(&mut bytes[..]);
        Ok(())
    }

    fn set_step(&self, step: usize) {
        self.watch.step.store(step, Ordering::SeqCst);
    }

    #[cfg(feature = "nccl")]
    fn average_on_device(&self, buf: &mut dyn Any) -> Option<Result<(), Error>> {
        use cudarc::nccl::safe::{Comm, Id, ReduceOp};
        use dfdx::tensor::{Cuda, Storage};
        let buf = buf.downcast_mut::<<Cuda as Storage<f32>>::Vec>()?;
        let slice: &mut cudarc::driver::CudaSlice<f32> = buf;
        Some((|| {
            let nccl_err = |e: cudarc::nccl::result::NcclError| {
                Error::Distributed(format!("NCCL failed: {e:?}"))
            };
            let mut comm = self.nccl.borrow_mut();
            if comm.is_none() {
                // NCCL's id comes from rank 0; MPI carries it to the others.
                let id = if self.shard.is_root() {
                    Id::new().map_err(nccl_err)?
                } else {
                    Id::uninit([0; 128])
                };
                let mut raw: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
                self.broadcast_bytes(&mut raw, "the NCCL set-up")?;
                let mut internal = [0 as std::ffi::c_char; 128];
                for (d, s) in internal.iter_mut().zip(&raw) {
                    *d = *s as std::ffi::c_char;
                }
                *comm = Some(
                    Comm::from_rank(
                        slice.device(),
                        self.shard.rank,
                        self.shard.world,
                        Id::uninit(internal),
                    )
                    .map_err(nccl_err)?,
                );
            }
            let comm = comm.as_ref().expect("set above");
            let dev = slice.device();
            let mut out = dev
                .alloc_zeros::<f32>(cudarc::driver::DeviceSlice::len(&*slice))
                .map_err(|e| Error::Device(format!("{e:?}")))?;
            let _w = self.watch.enter("the NCCL gradient all-reduce");
            comm.all_reduce(slice, &mut out, &ReduceOp::Avg)
                .map_err(nccl_err)?;
            // The old buffer is freed in stream order, after the all-reduce has read it.
            std::mem::swap(slice, &mut out);
            Ok(())
        })())
    }

    #[cfg(not(feature = "nccl"))]
    fn average_on_device(&self, buf: &mut dyn Any) -> Option<Result<(), Error>> {
        let _ = buf;
        None
    }
}
