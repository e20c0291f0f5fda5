//! Gradient checkpointing (`#[recompute]`): the gradients of a model whose blocks are recomputed
//! in the backward pass equal the plain model's, dropout masks included, and inference is
//! unchanged.

use neural_arch::prelude::*;

model! {
    /// A pre-norm block with dropout and attention, as the reference architectures have.
    pub struct Block<const D: usize> {
        ln_1: LayerNorm<D>,
        attn: CausalSelfAttention<D, 2>,
        ln_2: LayerNorm<D>,
        up: Linear<D, 16>,
        act: GeluTanh,
        down: Linear<16, D>,
        drop: Dropout<20>,
    }
    forward(x: [B, T, D]) -> [B, T, D] {
        let x = x + attn(ln_1(x));
        x + drop(down(act(up(ln_2(x)))))
    }
}

model! {
    /// The plain trunk.
    pub struct Plain<const D: usize> {
        proj: Linear<3, D>,
        blocks: [Block<D>; 3],
        last: Block<D>,
        ln_f: LayerNorm<D>,
    }
    forward(x: [B, T, 3]) -> [B, T, D];
}

model! {
    /// The same trunk, its repeated blocks recomputed one by one and the last as a whole.
    pub struct Recomputed<const D: usize> {
        proj: Linear<3, D>,
        #[recompute]
        blocks: [Block<D>; 3],
        #[recompute]
        last: Block<D>,
        ln_f: LayerNorm<D>,
    }
    forward(x: [B, T, 3]) -> [B, T, D];
}

/// The input's gradient and every parameter's, by key, after one traced forward pass of `m`
/// (dropout seeded with `seed`) and the loss `Σ y ⊙ w`.
fn gradients<M>(
    m: &mut M,
    x: &Tensor<(usize, usize, Const<3>), f64, Cpu>,
    w: &Tensor<(usize, usize, Const<8>), f64, Cpu>,
    seed: u64,
) -> (Vec<f64>, Vec<(String, Vec<f64>)>)
where
    M: ModuleMut<
            Tensor<(usize, usize, Const<3>), f64, Cpu, OwnedTape<f64, Cpu>>,
            Output = Tensor<(usize, usize, Const<8>), f64, Cpu, OwnedTape<f64, Cpu>>,
        > + TensorCollection<f64, Cpu>,
    M::Error: std::fmt::Debug,
{
    seed_dropout(seed);
    neural_arch::recompute::set_enabled(true);
    // Leaky: the input's gradient is kept too.
    let y = m.try_forward_mut(x.leaky_trace()).unwrap();
    let grads = (y * w.clone()).sum::<Rank0, _>().backward();
    let params = neural_arch::gradcheck::named_grads(m, &grads);
    (grads.get(x).as_vec(), params)
}

#[test]
fn recomputed_blocks_give_the_plain_gradients() {
    let x_dev = Cpu::seed_from_u64(1);
    let x: Tensor<(usize, usize, Const<3>), f64, _> = x_dev.sample_normal_like(&(2, 5, Const));
    let w: Tensor<(usize, usize, Const<8>), f64, _> = x_dev.sample_normal_like(&(2, 5, Const));
    // Built from the same seed, in the same order: the same parameters under the same keys.
    let mut plain = Cpu::seed_from_u64(9).build_module::<Plain<8>, f64>();
    let mut recomputed = Cpu::seed_from_u64(9).build_module::<Recomputed<8>, f64>();
    assert_eq!(
        neural_arch::checkpoint::tensor_shapes(&plain),
        neural_arch::checkpoint::tensor_shapes(&recomputed),
        "the keys and shapes of the two trunks"
    );
    // Inference is the plain forward pass.
    assert_eq!(
        plain.forward(x.clone()).as_vec(),
        recomputed.forward(x.clone()).as_vec()
    );
    for seed in [3, 4] {
        let (gx_plain, gp_plain) = gradients(&mut plain, &x, &w, seed);
        let (gx, gp) = gradients(&mut recomputed, &x, &w, seed);
        let close = |a: &[f64], b: &[f64], what: &str| {
            assert_eq!(a.len(), b.len(), "{what}");
            for (a, b) in a.iter().zip(b) {
                assert!(
                    (a - b).abs() <= 1e-12 * (1.0 + b.abs()),
                    "{what}: {a} vs {b}"
                );
            }
        };
        close(&gx, &gx_plain, "the input's gradient");
        assert_eq!(gp.len(), gp_plain.len());
        for ((k, g), (k_plain, g_plain)) in gp.iter().zip(&gp_plain) {
            assert_eq!(k, k_plain);
            assert!(g_plain.iter().any(|v| *v != 0.0), "{k} gets a gradient");
            close(g, g_plain, k);
        }
    }
    assert!(neural_arch::recompute::take_error().is_none());
}

#[test]
fn dropout_differs_between_seeds_so_the_test_above_checks_the_masks() {
    let x_dev = Cpu::seed_from_u64(1);
    let x: Tensor<(usize, usize, Const<3>), f64, _> = x_dev.sample_normal_like(&(2, 5, Const));
    let w: Tensor<(usize, usize, Const<8>), f64, _> = x_dev.sample_normal_like(&(2, 5, Const));
    let mut recomputed = Cpu::seed_from_u64(9).build_module::<Recomputed<8>, f64>();
    let (a, _) = gradients(&mut recomputed, &x, &w, 3);
    let (b, _) = gradients(&mut recomputed, &x, &w, 4);
    assert_ne!(a, b);
}

/// How many backward operations the tape of one traced forward pass of `m` holds, with
/// recomputation `on` or off (dfdx's `OwnedTape` prints its count).
fn recorded_operations<M>(
    m: &mut M,
    x: &Tensor<(usize, usize, Const<3>), f64, Cpu>,
    on: bool,
) -> usize
where
    M: ModuleMut<
            Tensor<(usize, usize, Const<3>), f64, Cpu, OwnedTape<f64, Cpu>>,
            Output = Tensor<(usize, usize, Const<8>), f64, Cpu, OwnedTape<f64, Cpu>>,
        > + TensorCollection<f64, Cpu>,
    M::Error: std::fmt::Debug,
{
    neural_arch::recompute::set_enabled(on);
    let (_, tape) = m.try_forward_mut(x.leaky_trace()).unwrap().split_tape();
    let text = format!("{tape:?}");
    let count = text
        .split("num_operations: ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok());
    count.unwrap_or_else(|| panic!("no operation count in {text}"))
}

#[test]
fn recomputed_blocks_leave_one_operation_each_on_the_tape() {
    let x_dev = Cpu::seed_from_u64(1);
    let x: Tensor<(usize, usize, Const<3>), f64, _> = x_dev.sample_normal_like(&(2, 5, Const));
    let mut m = Cpu::seed_from_u64(9).build_module::<Recomputed<8>, f64>();
    let mut plain = Cpu::seed_from_u64(9).build_module::<Plain<8>, f64>();
    let kept = recorded_operations(&mut plain, &x, true);
    let off = recorded_operations(&mut m, &x, false);
    let on = recorded_operations(&mut m, &x, true);
    assert_eq!(
        off, kept,
        "switched off, the trunk records what the plain one does"
    );
    // The projection, the final norm and one operation per recomputed block (four).
    assert!(
        on < kept / 4,
        "{on} operations recorded with recomputation, {kept} without"
    );
}
