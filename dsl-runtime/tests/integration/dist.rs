//! Data parallelism (`neural_arch::dist`) without an MPI launcher: a [`Collective`] over
//! threads of one process stands in for the ranks, so that the arithmetic of gradient
//! averaging and weight broadcasting is checked in every build (the `mpirun` tests of the
//! trainers need the `mpi` feature).

use neural_arch::dist::{all_gather_rows, average_gradients, broadcast_model, Collective, Shard};
use neural_arch::prelude::*;
use neural_arch::Error;
use std::sync::{Arc, Barrier, Mutex};

/// What the threads of a [`ThreadGroup`] share: one slot per rank, and a barrier.
struct Shared {
    slots: Mutex<Vec<Vec<f64>>>,
    bytes: Mutex<Vec<u8>>,
    barrier: Barrier,
}

/// One rank of a group whose ranks are threads.
struct ThreadGroup {
    shard: Shard,
    shared: Arc<Shared>,
}

impl ThreadGroup {
    fn sum(&self, send: Vec<f64>) -> Vec<f64> {
        self.shared.slots.lock().unwrap()[self.shard.rank] = send;
        self.shared.barrier.wait();
        let sum = {
            let slots = self.shared.slots.lock().unwrap();
            let mut acc = vec![0.0; slots[0].len()];
            for s in slots.iter() {
                for (a, v) in acc.iter_mut().zip(s) {
                    *a += v;
                }
            }
            acc
        };
        self.shared.barrier.wait();
        sum
    }

    fn root_values(&self, mine: Vec<f64>) -> Vec<f64> {
        if self.shard.is_root() {
            self.shared.slots.lock().unwrap()[0] = mine;
        }
        self.shared.barrier.wait();
        let v = self.shared.slots.lock().unwrap()[0].clone();
        self.shared.barrier.wait();
        v
    }
}

impl ThreadGroup {
    fn gather(&self, send: Vec<f64>) -> Vec<f64> {
        self.shared.slots.lock().unwrap()[self.shard.rank] = send;
        self.shared.barrier.wait();
        let all = self.shared.slots.lock().unwrap().concat();
        self.shared.barrier.wait();
        all
    }
}

impl Collective for ThreadGroup {
    fn shard(&self) -> Shard {
        self.shard
    }
    fn engine(&self) -> String {
        "threads".into()
    }
    fn all_reduce_sum_f32(&self, send: &[f32], sum: &mut [f32], _: &str) -> Result<(), Error> {
        let s = self.sum(send.iter().map(|&v| v as f64).collect());
        for (d, v) in sum.iter_mut().zip(s) {
            *d = v as f32;
        }
        Ok(())
    }
    fn all_reduce_sum_f64(&self, send: &[f64], sum: &mut [f64], _: &str) -> Result<(), Error> {
        sum.copy_from_slice(&self.sum(send.to_vec()));
        Ok(())
    }
    fn all_gather_f32(&self, send: &[f32], all: &mut [f32], _: &str) -> Result<(), Error> {
        let a = self.gather(send.iter().map(|&v| v as f64).collect());
        for (d, v) in all.iter_mut().zip(a) {
            *d = v as f32;
        }
        Ok(())
    }
    fn all_gather_f64(&self, send: &[f64], all: &mut [f64], _: &str) -> Result<(), Error> {
        all.copy_from_slice(&self.gather(send.to_vec()));
        Ok(())
    }
    fn broadcast_f32(&self, buf: &mut [f32], _: &str) -> Result<(), Error> {
        let v = self.root_values(buf.iter().map(|&v| v as f64).collect());
        for (d, s) in buf.iter_mut().zip(v) {
            *d = s as f32;
        }
        Ok(())
    }
    fn broadcast_f64(&self, buf: &mut [f64], _: &str) -> Result<(), Error> {
        buf.copy_from_slice(&self.root_values(buf.to_vec()));
        Ok(())
    }
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>, _: &str) -> Result<(), Error> {
        if self.shard.is_root() {
            *self.shared.bytes.lock().unwrap() = bytes.clone();
        }
        self.shared.barrier.wait();
        *bytes = self.shared.bytes.lock().unwrap().clone();
        self.shared.barrier.wait();
        Ok(())
    }
}

type Net = (Linear<6, 12>, ReLU, Linear<12, 3>);

/// The batch: 8 inputs and targets, the same on every rank.
fn batch<E: Dtype>() -> (Vec<E>, Vec<E>) {
    let x = (0..8 * 6)
        .map(|i| E::from_f64(((i * 37 % 17) as f64 - 8.0) / 5.0).unwrap())
        .collect();
    let y = (0..8 * 3)
        .map(|i| E::from_f64(((i * 11 % 7) as f64 - 3.0) / 3.0).unwrap())
        .collect();
    (x, y)
}

/// `fn $name(seed, rows, group) -> Vec<f64>`: the gradients (weights and biases of both
/// layers, flattened) of the mean squared error of `rows` of the batch, for a model built
/// with `seed` in element type `$e`, broadcast from and averaged across `group` when given.
macro_rules! gradients_fn {
    ($name:ident, $e:ty) => {
        fn $name(seed: u64, rows: std::ops::Range<usize>, group: Option<&ThreadGroup>) -> Vec<f64> {
            let dev = Cpu::seed_from_u64(seed);
            let mut model = dev.build_module::<Net, $e>();
            if let Some(g) = group {
                broadcast_model(g, &mut model).unwrap();
            }
            let (x, y) = batch::<$e>();
            let n = rows.len();
            let x = dev.tensor_from_vec(x[rows.start * 6..rows.end * 6].to_vec(), (n, Const::<6>));
            let y = dev.tensor_from_vec(y[rows.start * 3..rows.end * 3].to_vec(), (n, Const::<3>));
            let grads = model.alloc_grads();
            let out = model.forward_mut(x.traced(grads));
            let mut grads = (out - y).square().mean().backward();
            if let Some(g) = group {
                average_gradients(g, &model, &mut grads).unwrap();
            }
            [
                grads.get(&model.0.weight).as_vec(),
                grads.get(&model.0.bias).as_vec(),
                grads.get(&model.2.weight).as_vec(),
                grads.get(&model.2.bias).as_vec(),
            ]
            .concat()
            .iter()
            .map(|&v| v as f64)
            .collect()
        }
    };
}

gradients_fn!(gradients_f64, f64);
gradients_fn!(gradients_f32, f32);

/// Runs `f(rank, group)` on `world` threads and returns their results in rank order.
fn on_threads<T: Send + 'static>(
    world: usize,
    f: impl Fn(ThreadGroup) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let shared = Arc::new(Shared {
        slots: Mutex::new(vec![Vec::new(); world]),
        bytes: Mutex::new(Vec::new()),
        barrier: Barrier::new(world),
    });
    let f = Arc::new(f);
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let (shared, f) = (shared.clone(), f.clone());
            std::thread::spawn(move || {
                f(ThreadGroup {
                    shard: Shard { rank, world },
                    shared,
                })
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn averaged_shard_gradients_are_the_whole_batch_gradient() {
    // f64: the average of the shards' mean gradients equals the whole batch's to rounding.
    let whole = gradients_f64(7, 0..8, None);
    for world in [2, 4] {
        // Each rank starts from other weights (seed 100 + rank): the broadcast makes them
        // rank 0's, which are seed 100's.
        let reference = {
            let all = gradients_f64(100, 0..8, None);
            assert_ne!(all, whole);
            all
        };
        let per_rank = on_threads(world, move |g| {
            let rows = g.shard().rows(8).unwrap();
            gradients_f64(100 + g.shard().rank as u64, rows, Some(&g))
        });
        for got in &per_rank {
            assert_eq!(got.len(), reference.len());
            for (a, b) in got.iter().zip(&reference) {
                assert!((a - b).abs() <= 1e-12 * b.abs().max(1.0), "{a} vs {b}");
            }
        }
        // Every rank holds the same averaged gradients, bit for bit.
        assert!(per_rank.iter().all(|g| g == &per_rank[0]));
    }
    // f32 gradients travel as f32.
    let reference = gradients_f32(3, 0..8, None);
    let per_rank = on_threads(2, |g| {
        let rows = g.shard().rows(8).unwrap();
        gradients_f32(3, rows, Some(&g))
    });
    for (a, b) in per_rank[1].iter().zip(&reference) {
        assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
    }
}

/// Two encoders and a temperature: CLIP in miniature.
type Dual = (Linear<5, 4>, Linear<3, 4>, LogitScale);

/// `fn $name(seed, rows, group) -> (loss, gradients)`: the contrastive loss of the whole batch
/// of 8 pairs and its gradients (both encoders' weights and biases and the temperature), for a
/// model built with `seed` in `$e`. With `group`, this rank encodes only `rows`, the embeddings
/// are all-gathered, and the gradients averaged.
macro_rules! contrastive_fn {
    ($name:ident, $e:ty) => {
        fn $name(
            seed: u64,
            rows: std::ops::Range<usize>,
            group: Option<&ThreadGroup>,
        ) -> (f64, Vec<f64>) {
            let dev = Cpu::seed_from_u64(seed);
            let mut model = dev.build_module::<Dual, $e>();
            if let Some(g) = group {
                broadcast_model(g, &mut model).unwrap();
            }
            let value = |i: usize, m: usize| ((i * m % 23) as f64 - 11.0) / 6.0;
            let n = rows.len();
            let images: Vec<$e> = (rows.start * 5..rows.end * 5)
                .map(|i| value(i, 7) as $e)
                .collect();
            let texts: Vec<$e> = (rows.start * 3..rows.end * 3)
                .map(|i| value(i, 13) as $e)
                .collect();
            let images = dev.tensor_from_vec(images, (n, Const::<5>));
            let texts = dev.tensor_from_vec(texts, (n, Const::<3>));
            let image = model.0.forward(images.traced(model.alloc_grads()));
            let text = model.1.forward(texts.leaky_traced());
            let (image, text) = match group {
                Some(g) => (
                    all_gather_rows(g, image).unwrap(),
                    all_gather_rows(g, text).unwrap(),
                ),
                None => (image, text),
            };
            assert_eq!(image.shape().0, 8);
            let loss = clip_loss(image, text, &model.2).unwrap();
            let value = loss.array() as f64;
            let mut grads = loss.backward();
            if let Some(g) = group {
                average_gradients(g, &model, &mut grads).unwrap();
            }
            let grads = [
                grads.get(&model.0.weight).as_vec(),
                grads.get(&model.0.bias).as_vec(),
                grads.get(&model.1.weight).as_vec(),
                grads.get(&model.1.bias).as_vec(),
                grads.get(&model.2.logit_scale).as_vec(),
            ]
            .concat()
            .iter()
            .map(|&v| v as f64)
            .collect();
            (value, grads)
        }
    };
}

contrastive_fn!(contrastive_f64, f64);
contrastive_fn!(contrastive_f32, f32);

#[test]
fn gathered_contrastive_loss_has_the_whole_batch_gradient() {
    // Every image is compared with every caption of the batch, including the other ranks':
    // the loss is not a mean over shards, and sharding it without the gather would change it.
    let (loss, reference) = contrastive_f64(5, 0..8, None);
    assert!(reference.iter().all(|g| g.is_finite()));
    assert!(reference.iter().filter(|g| g.abs() > 1e-6).count() > reference.len() / 2);
    for world in [2, 4] {
        let per_rank = on_threads(world, move |g| {
            let rows = g.shard().rows(8).unwrap();
            contrastive_f64(5 + g.shard().rank as u64, rows, Some(&g))
        });
        for (l, got) in &per_rank {
            assert!(
                (l - loss).abs() <= 1e-12,
                "world {world}: loss {l} vs {loss}"
            );
            for (k, (a, b)) in got.iter().zip(&reference).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-12 * b.abs().max(1.0),
                    "world {world}, gradient {k}: {a} vs {b}"
                );
            }
        }
        assert!(per_rank.iter().all(|r| r == &per_rank[0]));
    }
    let (loss, reference) = contrastive_f32(9, 0..8, None);
    let per_rank = on_threads(2, |g| {
        let rows = g.shard().rows(8).unwrap();
        contrastive_f32(9, rows, Some(&g))
    });
    for (l, got) in &per_rank {
        assert!((l - loss).abs() <= 1e-6 * loss.abs(), "{l} vs {loss}");
        for (a, b) in got.iter().zip(&reference) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        }
    }
}

#[test]
fn one_process_is_left_alone() {
    let dev = Cpu::default();
    let mut model = dev.build_module::<Net, f32>();
    let before = model.0.weight.as_vec();
    let single = neural_arch::dist::SingleProcess;
    broadcast_model(&single, &mut model).unwrap();
    assert_eq!(model.0.weight.as_vec(), before);
    assert_eq!(single.shard(), Shard::SINGLE);
}
