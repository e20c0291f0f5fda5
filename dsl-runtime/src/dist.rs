//! Data-parallel training across processes, on an established engine: MPI between CPU
//! processes (the `mpi` feature, through rsmpi), NCCL between GPUs (the `nccl` feature, through
//! cudarc, with MPI only to launch the processes and hand out NCCL's id).
//!
//! The scheme is PyTorch's `DistributedDataParallel`:
//!
//! - `N` processes (ranks), started together by `mpirun -np N`, each hold a whole copy of the
//!   model. Rank 0's initial weights are broadcast to the others before the first step.
//! - Every global batch of `B` examples is cut into `N` contiguous shards of `B / N` ([`Shard`]);
//!   each rank runs the forward and backward pass on its own.
//! - Before the optimizer step, the gradients are averaged across ranks with an all-reduce
//!   ([`average_gradients`]). Every rank then takes the same optimizer step from the same
//!   weights with the same gradients, so the copies stay identical without being sent again.
//!
//! The mean of the shards' mean losses is the global batch's mean loss, and the average of
//! their gradients is its gradient: `N` processes compute, to float rounding, what one process
//! computes on the whole batch (a test runs both). Layers that look across a batch (BatchNorm)
//! see only their shard, as in PyTorch without `SyncBatchNorm`; their running statistics are
//! each rank's own, and rank 0's are evaluated and saved, as PyTorch's default of broadcasting
//! rank 0's buffers gives.
//!
//! A loss that compares every example of the batch with every other, as CLIP's contrastive
//! loss does, is not a mean over shards. Such a loss is computed on every rank from the whole
//! batch's embeddings, gathered by [`all_gather_rows`], whose backward pass sends each rank's
//! share of the gradient to its own rows.
//!
//! A rank that stops must not leave the others waiting forever. A rank that exits or crashes is
//! noticed by `mpirun`, which ends the job. A rank that is alive but stuck is caught by the
//! others' watchdog: a collective that waits longer than the timeout ends its process with an
//! error naming the operation and the step, and `mpirun` then ends the rest.

use crate::optim::buffers::{axpby, cpu_slice, overwrite};
use crate::Error;
use dfdx::nn::{RecursiveWalker, TensorCollection, TensorOptions, TensorVisitor, ViewTensorMut};
use dfdx::shapes::{Const, Dtype, HasShape, Shape};
use dfdx::tensor::{Gradients, PutTape, SplitTape, Tape, Tensor};
use dfdx::tensor_ops::Device;
use std::any::Any;
use std::ops::Range;

#[cfg(feature = "mpi")]
mod mpi_group;
#[cfg(feature = "mpi")]
pub use mpi_group::MpiGroup;

/// This process's part of a data-parallel group: its rank and the number of ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This process's index, `0..world`.
    pub rank: usize,
    /// The number of processes.
    pub world: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Shard::SINGLE
    }
}

impl Shard {
    /// One process that sees every example.
    pub const SINGLE: Shard = Shard { rank: 0, world: 1 };

    /// This rank's rows of a global batch of `global` examples: the `rank`-th of `world`
    /// contiguous, equal parts. A batch that does not split evenly is an error naming the
    /// sizes that do (unequal shards would weigh some examples more than others).
    pub fn rows(&self, global: usize) -> Result<Range<usize>, Error> {
        if !global.is_multiple_of(self.world) || global == 0 {
            return Err(Error::Config(format!(
                "a batch of {global} examples does not split evenly over {} processes; use a \
                 --batch-size that is a multiple of {}",
                self.world, self.world
            )));
        }
        let per = global / self.world;
        Ok(self.rank * per..(self.rank + 1) * per)
    }

    /// This rank's part of `n` items that need not split evenly (held-out examples): the
    /// `rank`-th of `world` contiguous parts whose sizes differ by at most one.
    pub fn part(&self, n: usize) -> Range<usize> {
        n * self.rank / self.world..n * (self.rank + 1) / self.world
    }

    /// Whether this process writes the run's files (rank 0).
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }
}

/// The collective operations data-parallel training needs, implemented by an engine
/// (`MpiGroup` with the `mpi` feature). Every rank must call the same operations in the same
/// order with buffers of the same length; `what` names the operation in a timeout's error.
pub trait Collective {
    /// This process's place in the group.
    fn shard(&self) -> Shard;

    /// The engine, for logs (`"Open MPI v4.1.4"`, `"NCCL over ..."`).
    fn engine(&self) -> String;

    /// `sum ← Σ over ranks of send`, element by element (`sum` holds as many as `send`).
    fn all_reduce_sum_f32(&self, send: &[f32], sum: &mut [f32], what: &str) -> Result<(), Error>;

    /// `sum ← Σ over ranks of send`, element by element (`sum` holds as many as `send`).
    fn all_reduce_sum_f64(&self, send: &[f64], sum: &mut [f64], what: &str) -> Result<(), Error>;

    /// `all ← the ranks' send, one after another in rank order` (`all` holds `world` times
    /// as many as `send`; every rank sends as many).
    fn all_gather_f32(&self, send: &[f32], all: &mut [f32], what: &str) -> Result<(), Error>;

    /// `all ← the ranks' send, one after another in rank order` (`all` holds `world` times
    /// as many as `send`; every rank sends as many).
    fn all_gather_f64(&self, send: &[f64], all: &mut [f64], what: &str) -> Result<(), Error>;

    /// `buf ← rank 0's buf`.
    fn broadcast_f32(&self, buf: &mut [f32], what: &str) -> Result<(), Error>;

    /// `buf ← rank 0's buf`.
    fn broadcast_f64(&self, buf: &mut [f64], what: &str) -> Result<(), Error>;

    /// `bytes ← rank 0's bytes`, whatever their length on the other ranks.
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, what: &str) -> Result<(), Error>;

    /// Averages a device gradient buffer (`D::Vec`) across ranks in place on the device, when
    /// this engine can (NCCL on CUDA); `None` sends it through the host instead.
    fn average_on_device(&self, buf: &mut dyn Any) -> Option<Result<(), Error>> {
        let _ = buf;
        None
    }

    /// Marks the step the next collectives belong to, for a timeout's error.
    fn set_step(&self, step: usize) {
        let _ = step;
    }
}

/// Averages the gradients of `model`'s trainable tensors across the ranks of `group`, in
/// place: afterwards every rank holds the same gradients, the mean of the ranks' own.
///
/// On the CPU the gradients are packed into one buffer and sent in a single all-reduce (in
/// `f32`, or `f64` for an `f64` model); an engine that reduces on the device (NCCL) reduces
/// each buffer where it lies.
pub fn average_gradients<E, D, M>(
    group: &dyn Collective,
    model: &M,
    grads: &mut Gradients<E, D>,
) -> Result<(), Error>
where
    E: Dtype,
    D: Device<E>,
    M: TensorCollection<E, D>,
    Error: From<D::Err>,
{
    let world = group.shard().world;
    if world == 1 {
        return Ok(());
    }
    if std::mem::size_of::<E>() > 4 {
        average_through::<f64, E, D, M>(group, model, grads)
    } else {
        average_through::<f32, E, D, M>(group, model, grads)
    }
}

/// A number type MPI sums: what the gradients travel as (`f32`, or `f64` for an `f64` model).
trait Wire: Copy + Default + num_traits::NumCast + std::ops::MulAssign + 'static {
    fn all_reduce(g: &dyn Collective, send: &[Self], sum: &mut [Self]) -> Result<(), Error>;
    fn all_gather(g: &dyn Collective, send: &[Self], all: &mut [Self]) -> Result<(), Error>;
}

impl Wire for f32 {
    fn all_reduce(g: &dyn Collective, send: &[f32], sum: &mut [f32]) -> Result<(), Error> {
        g.all_reduce_sum_f32(send, sum, "the gradient all-reduce")
    }
    fn all_gather(g: &dyn Collective, send: &[f32], all: &mut [f32]) -> Result<(), Error> {
        g.all_gather_f32(send, all, "the embedding all-gather")
    }
}

impl Wire for f64 {
    fn all_reduce(g: &dyn Collective, send: &[f64], sum: &mut [f64]) -> Result<(), Error> {
        g.all_reduce_sum_f64(send, sum, "the gradient all-reduce")
    }
    fn all_gather(g: &dyn Collective, send: &[f64], all: &mut [f64]) -> Result<(), Error> {
        g.all_gather_f64(send, all, "the embedding all-gather")
    }
}

/// The rows of every rank's `local`, stacked in rank order: what a loss that compares every
/// example of the global batch with every other (CLIP's contrastive loss) is computed on, as
/// `torch.distributed.nn.functional.all_gather` gives it in open_clip.
///
/// `local` is this rank's `[b, K]` (every rank has the same `b`); the result is `[world·b, K]`,
/// this rank's rows at `rank·b..(rank+1)·b`. The gradient flows back to `local` only; the other
/// ranks' rows are constants here, as they are computed, and differentiated, on their own rank.
///
/// **The backward pass** gives `local` `world` times the gradient of its own rows. PyTorch's
/// gather-with-gradient sums, over the ranks, each rank's gradient with respect to this rank's
/// rows (a reduce-scatter). When every rank computes the same loss from the same gathered rows,
/// as a data-parallel step does, those gradients are equal, and their sum is `world` times this
/// rank's own: the same result, without a collective in the backward pass. After
/// [`average_gradients`] divides by `world`, each encoder parameter holds the gradient of the
/// global loss through every example, and a parameter used by the loss itself on every rank
/// (CLIP's temperature) holds that loss's gradient once, as one process on the whole batch
/// computes. Pass the same global loss to the trainer on every rank: it reports the mean over
/// ranks, which is that loss.
///
/// With one process it returns `local` unchanged.
pub fn all_gather_rows<const K: usize, E, D, T>(
    group: &dyn Collective,
    local: Tensor<(usize, Const<K>), E, D, T>,
) -> Result<Tensor<(usize, Const<K>), E, D, T>, Error>
where
    E: Dtype,
    D: Device<E>,
    T: Tape<E, D>,
    Error: From<D::Err>,
{
    let Shard { rank, world } = group.shard();
    if world == 1 {
        return Ok(local);
    }
    let b = local.shape().0;
    let (x, mut tape) = local.split_tape();
    let values = x.as_vec();
    let gathered: Vec<E> = if std::mem::size_of::<E>() > 4 {
        gather_through::<f64, E>(group, &values)?
    } else {
        gather_through::<f32, E>(group, &values)?
    };
    let out = x
        .device()
        .try_tensor_from_vec(gathered, (world * b, Const::<K>))?;
    if T::OWNS_TAPE {
        let (x_ghost, out_ghost) = (x.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            grads.try_alloc_for(&out_ghost)?;
            let mine = grads
                .get(&out_ghost)
                .try_slice((rank * b..(rank + 1) * b, ..))?;
            axpby(grads.get_or_alloc_mut(&x_ghost)?, 1.0, mine, world as f64)
        });
    }
    Ok(out.put_tape(tape))
}

fn gather_through<W: Wire, E: Dtype>(
    group: &dyn Collective,
    values: &[E],
) -> Result<Vec<E>, Error> {
    let nan: W = num_traits::cast(f64::NAN).unwrap_or_default();
    let send: Vec<W> = values
        .iter()
        .map(|v| <W as num_traits::NumCast>::from(*v).unwrap_or(nan))
        .collect();
    let mut all = vec![W::default(); send.len() * group.shard().world];
    W::all_gather(group, &send, &mut all)?;
    Ok(all
        .iter()
        .map(|v| v.to_f64().and_then(E::from_f64).unwrap_or_default())
        .collect())
}

fn average_through<W, E, D, M>(
    group: &dyn Collective,
    model: &M,
    grads: &mut Gradients<E, D>,
) -> Result<(), Error>
where
    W: Wire,
    E: Dtype,
    D: Device<E>,
    M: TensorCollection<E, D>,
    Error: From<D::Err>,
{
    let mut pack = Pack::<E, D, W> {
        grads,
        group,
        mode: PackMode::Gather,
        values: Vec::new(),
        at: 0,
        on_device: None,
        error: None,
    };
    walk(model, &mut pack)?;
    if let Some(e) = pack.error.take() {
        return Err(e);
    }
    if pack.on_device == Some(true) {
        return Ok(());
    }
    let mut sum = vec![W::default(); pack.values.len()];
    W::all_reduce(group, &pack.values, &mut sum)?;
    let inv: W = num_traits::cast(1.0 / group.shard().world as f64).unwrap_or_default();
    sum.iter_mut().for_each(|v| *v *= inv);
    pack.values = sum;
    pack.mode = PackMode::Scatter;
    walk(model, &mut pack)?;
    match pack.error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Copies rank 0's values of every tensor of `model` (trainable or not) to the other ranks:
/// what makes the copies start equal, whatever each rank initialised or loaded.
pub fn broadcast_model<E, D, M>(group: &dyn Collective, model: &mut M) -> Result<(), Error>
where
    E: Dtype,
    D: Device<E>,
    M: TensorCollection<E, D>,
    Error: From<D::Err>,
{
    if group.shard().world == 1 {
        return Ok(());
    }
    let mut read = Values {
        out: Vec::new(),
        write: None::<std::vec::IntoIter<f64>>,
    };
    M::iter_tensors(&mut RecursiveWalker {
        m: &mut *model,
        f: &mut read,
    })?;
    let mut values = read.out;
    if std::mem::size_of::<E>() > 4 {
        group.broadcast_f64(&mut values, "the weight broadcast")?;
    } else {
        let mut narrow: Vec<f32> = values.iter().map(|&v| v as f32).collect();
        group.broadcast_f32(&mut narrow, "the weight broadcast")?;
        values = narrow.into_iter().map(f64::from).collect();
    }
    let mut write = Values {
        out: Vec::new(),
        write: Some(values.into_iter()),
    };
    M::iter_tensors(&mut RecursiveWalker {
        m: model,
        f: &mut write,
    })?;
    Ok(())
}

fn walk<E, D, M, W: Wire>(model: &M, pack: &mut Pack<'_, E, D, W>) -> Result<(), Error>
where
    E: Dtype,
    D: Device<E>,
    M: TensorCollection<E, D>,
    Error: From<D::Err>,
{
    M::iter_tensors(&mut RecursiveWalker { m: model, f: pack })?;
    Ok(())
}

#[derive(Clone, Copy, PartialEq)]
enum PackMode {
    Gather,
    Scatter,
}

/// Visits the trainable tensors: gathers their gradients into `values`, or scatters `values`
/// back; or, when the engine averages on the device, hands each buffer to it.
struct Pack<'a, E: Dtype, D: Device<E>, W> {
    grads: &'a mut Gradients<E, D>,
    group: &'a dyn Collective,
    mode: PackMode,
    values: Vec<W>,
    at: usize,
    on_device: Option<bool>,
    error: Option<Error>,
}

impl<E: Dtype, D: Device<E>, W: Wire> TensorVisitor<E, D> for Pack<'_, E, D, W> {
    type Viewer = dfdx::nn::ViewTensorRef;
    type Err = D::Err;
    type E2 = E;
    type D2 = D;

    fn visit<S: Shape>(
        &mut self,
        opts: TensorOptions<S, E, D>,
        t: &Tensor<S, E, D>,
    ) -> Result<Option<Tensor<S, E, D>>, D::Err> {
        if !opts.do_gradient_update || self.error.is_some() {
            return Ok(None);
        }
        let n = t.shape().num_elements();
        match self.mode {
            PackMode::Gather => {
                let buf = self.grads.get_or_alloc_mut(t)?;
                if self.on_device != Some(false) {
                    match self.group.average_on_device(buf as &mut dyn Any) {
                        Some(r) => {
                            self.on_device = Some(true);
                            if let Err(e) = r {
                                self.error = Some(e);
                            }
                            return Ok(None);
                        }
                        None => self.on_device = Some(false),
                    }
                }
                let nan: W = num_traits::cast(f64::NAN).unwrap_or_default();
                let wire = |v: &E| <W as num_traits::NumCast>::from(*v).unwrap_or(nan);
                match cpu_slice::<E, D>(buf) {
                    Some(s) => self.values.extend(s.iter().map(wire)),
                    None => self
                        .values
                        .extend(self.grads.get(t).as_vec().iter().map(wire)),
                }
            }
            PackMode::Scatter => {
                let part = &self.values[self.at..self.at + n];
                self.at += n;
                let buf = self.grads.get_or_alloc_mut(t)?;
                let back = |v: &W| v.to_f64().and_then(E::from_f64).unwrap_or_default();
                match cpu_slice::<E, D>(buf) {
                    Some(s) => {
                        for (d, v) in s.iter_mut().zip(part) {
                            *d = back(v);
                        }
                    }
                    None => {
                        let host: Vec<E> = part.iter().map(back).collect();
                        let src = t.device().try_tensor_from_vec(host, *t.shape())?;
                        overwrite(buf, src)?;
                    }
                }
            }
        }
        Ok(None)
    }
}

/// Visits every tensor: reads its values into `out`, or, with `write`, replaces them in place
/// (the tensor keeps its identity, which the optimizer's state is keyed by).
struct Values<I> {
    out: Vec<f64>,
    write: Option<I>,
}

impl<E, D, I> TensorVisitor<E, D> for Values<I>
where
    E: Dtype,
    D: Device<E>,
    I: Iterator<Item = f64>,
{
    type Viewer = ViewTensorMut;
    type Err = D::Err;
    type E2 = E;
    type D2 = D;

    fn visit<S: Shape>(
        &mut self,
        _: TensorOptions<S, E, D>,
        t: &mut Tensor<S, E, D>,
    ) -> Result<Option<Tensor<S, E, D>>, D::Err> {
        match &mut self.write {
            None => self
                .out
                .extend(t.as_vec().iter().map(|v| v.to_f64().unwrap_or(f64::NAN))),
            Some(values) => {
                let n = t.shape().num_elements();
                let host: Vec<E> = values
                    .by_ref()
                    .take(n)
                    .map(|v| E::from_f64(v).unwrap_or_default())
                    .collect();
                t.copy_from(&host);
            }
        }
        Ok(None)
    }
}

/// The group of one process: every collective is the identity. For code written against
/// [`Collective`] that must also run alone (the trainer itself simply has no group then).
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn shard(&self) -> Shard {
        Shard::SINGLE
    }
    fn engine(&self) -> String {
        "one process".into()
    }
    fn all_reduce_sum_f32(&self, send: &[f32], sum: &mut [f32], _: &str) -> Result<(), Error> {
        sum.copy_from_slice(send);
        Ok(())
    }
    fn all_reduce_sum_f64(&self, send: &[f64], sum: &mut [f64], _: &str) -> Result<(), Error> {
        sum.copy_from_slice(send);
        Ok(())
    }
    fn all_gather_f32(&self, send: &[f32], all: &mut [f32], _: &str) -> Result<(), Error> {
        all.copy_from_slice(send);
        Ok(())
    }
    fn all_gather_f64(&self, send: &[f64], all: &mut [f64], _: &str) -> Result<(), Error> {
        all.copy_from_slice(send);
        Ok(())
    }
    fn broadcast_f32(&self, _: &mut [f32], _: &str) -> Result<(), Error> {
        Ok(())
    }
    fn broadcast_f64(&self, _: &mut [f64], _: &str) -> Result<(), Error> {
        Ok(())
    }
    fn broadcast_bytes(&self, _: &mut Vec<u8>, _: &str) -> Result<(), Error> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_contiguous_equal_parts() {
        let parts: Vec<Range<usize>> = (0..4)
            .map(|rank| Shard { rank, world: 4 }.rows(12).unwrap())
            .collect();
        assert_eq!(parts, vec![0..3, 3..6, 6..9, 9..12]);
        assert_eq!(Shard::SINGLE.rows(5).unwrap(), 0..5);
        let e = Shard { rank: 1, world: 4 }
            .rows(10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("multiple of 4"), "{e}");
        let parts: Vec<Range<usize>> = (0..4)
            .map(|rank| Shard { rank, world: 4 }.part(10))
            .collect();
        assert_eq!(parts, vec![0..2, 2..5, 5..7, 7..10]);
        assert_eq!(Shard { rank: 2, world: 3 }.part(1), 0..1);
        assert_eq!(Shard::SINGLE.part(7), 0..7);
    }
}
