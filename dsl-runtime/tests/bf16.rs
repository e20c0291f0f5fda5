//! `bf16`, the element type the vendored dfdx gains (vendor/dfdx/PATCHED.md): its matrix
//! products accumulate in `f32`, mixed precision in it gives the `f32` gradients to its
//! precision without loss scaling, overflow is still found, and the cross-entropy over a large
//! vocabulary does not stall.

use neural_arch::amp::{mixed_step, GradScaler, HalfFloat};
use neural_arch::dfdx::dtypes::bf16;
use neural_arch::prelude::*;

model! {
    /// A small classifier with the layers whose precision matters: products, a norm, an
    /// activation.
    pub struct Mlp {
        up: Linear<16, 32>,
        ln: LayerNorm<32>,
        act: GeluTanh,
        down: Linear<32, 8>,
    }
    forward(x: [B, 16]) -> [B, 8];
}

type Master = Built<Mlp, f32, Cpu>;
type Work = Built<Mlp, bf16, Cpu>;

/// `v` rounded to bf16 and back.
fn round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
}

/// Every element of `got` within one bf16 rounding (2⁻⁸ relative) of `want`.
fn assert_bf16_close(got: &[bf16], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let g = g.to_f32();
        assert!(
            (g - w).abs() <= w.abs() * 2f32.powi(-8) + 1e-30,
            "{what}[{i}]: {g} vs {w}"
        );
    }
}

#[test]
fn bf16_products_are_the_f32_products_of_the_operands_rounded_once() {
    let dev = Cpu::seed_from_u64(7);
    let a: Tensor<Rank2<5, 7>, f32, Cpu> = dev.sample_normal();
    let b: Tensor<Rank2<7, 3>, f32, Cpu> = dev.sample_normal();
    let (a, b) = (
        dev.tensor_from_vec(round(&a.as_vec()), (Const::<5>, Const::<7>)),
        dev.tensor_from_vec(round(&b.as_vec()), (Const::<7>, Const::<3>)),
    );
    let (ah, bh) = (a.clone().to_dtype::<bf16>(), b.clone().to_dtype::<bf16>());

    // Contiguous operands.
    let want = a.clone().matmul(b.clone()).as_vec();
    assert_bf16_close(&ah.clone().matmul(bh.clone()).as_vec(), &want, "a·b");

    // A transposed (strided) operand.
    let at = a.clone().permute::<Rank2<7, 5>, _>();
    let want = at
        .clone()
        .permute::<Rank2<5, 7>, _>()
        .matmul(b.clone())
        .as_vec();
    let ath = ah.clone().permute::<Rank2<7, 5>, _>();
    let got = ath.permute::<Rank2<5, 7>, _>().matmul(bh.clone()).as_vec();
    assert_bf16_close(&got, &want, "(aᵀ)ᵀ·b");

    // A batch of products.
    let x: Tensor<Rank3<2, 4, 7>, f32, Cpu> = dev.sample_normal();
    let x = dev.tensor_from_vec(round(&x.as_vec()), (Const::<2>, Const::<4>, Const::<7>));
    let want = x.clone().matmul(b.clone()).as_vec();
    let got = x.to_dtype::<bf16>().matmul(bh.clone()).as_vec();
    assert_bf16_close(&got, &want, "batched x·b");

    // The backward pass accumulates into the gradients (gemm with accumulation).
    let g = ah.clone().leaky_trace().matmul(bh.clone()).sum().backward();
    let gf = a.clone().leaky_trace().matmul(b.clone()).sum().backward();
    assert_bf16_close(&g.get(&ah).as_vec(), &gf.get(&a).as_vec(), "∂/∂a");
}

#[test]
fn mixed_bf16_gradients_equal_f32_gradients_to_bf16_precision_without_scaling() {
    let dev = Cpu::seed_from_u64(0);
    let mut master: Master = dev.build_module::<Mlp, f32>();
    let mut work: Work = master.to_dtype::<bf16>();
    let x: Tensor<Rank2<64, 16>, f32, Cpu> = dev.sample_normal();
    let v = x.as_vec();
    let y: Vec<usize> = v
        .chunks(16)
        .map(|r| (0..8).fold(0, |best, j| if r[j] > r[best] { j } else { best }))
        .collect();
    let x = dev.tensor_from_vec(v, (64, Const::<16>));
    let (want_loss, want) = {
        let loss = cross_entropy(
            master.forward(x.clone().leaky_trace()),
            &y,
            Default::default(),
        )
        .unwrap();
        (loss.array() as f64, loss.backward())
    };
    let scaler = bf16::scaler();
    assert_eq!((scaler.scale, scaler.max_scale), (1.0, 1.0));
    let mut grads = master.alloc_grads();
    let out = mixed_step(&mut master, &mut work, &mut grads, &scaler, |h, g| {
        let xh = x.clone().to_dtype::<bf16>();
        let loss = cross_entropy(h.forward_mut(xh.traced(g)), &y, Default::default())?;
        Ok((loss, 64))
    })
    .unwrap();
    assert!(!out.found_inf);
    assert!(
        (out.loss - want_loss).abs() < 3e-2 * want_loss,
        "{} vs {want_loss}",
        out.loss
    );
    let rel = |a: Vec<f32>, b: Vec<f32>| {
        let d: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum();
        let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        (d / n).sqrt()
    };
    for (name, e) in [
        (
            "up.weight",
            rel(
                grads.get(&master.up.weight).as_vec(),
                want.get(&master.up.weight).as_vec(),
            ),
        ),
        (
            "ln.weight",
            rel(
                grads.get(&master.ln.weight).as_vec(),
                want.get(&master.ln.weight).as_vec(),
            ),
        ),
        (
            "down.bias",
            rel(
                grads.get(&master.down.bias).as_vec(),
                want.get(&master.down.bias).as_vec(),
            ),
        ),
    ] {
        // bf16 has an 8-bit significand: 2⁻⁸ ≈ 4e-3 per rounding.
        assert!(e < 5e-2, "{name}: relative error {e}");
        assert!(e > 0.0, "{name}: bf16 cannot be exact");
    }
}

#[test]
fn a_bf16_step_that_overflows_is_found() {
    let dev = Cpu::seed_from_u64(0);
    let mut master: Master = dev.build_module::<Mlp, f32>();
    let mut work: Work = master.to_dtype::<bf16>();
    let x: Tensor<Rank2<4, 16>, f32, Cpu> = dev.sample_normal();
    let mut grads = master.alloc_grads();
    let out = mixed_step(
        &mut master,
        &mut work,
        &mut grads,
        &bf16::scaler(),
        |h, g| {
            // Logits past bf16's largest value (3.4e38): the loss and its gradients overflow.
            let logits = h.forward_mut(x.clone().to_dtype::<bf16>().traced(g)) * bf16::MAX;
            Ok((
                cross_entropy(logits * bf16::MAX, &[0, 1, 2, 3], Default::default())?,
                4,
            ))
        },
    )
    .unwrap();
    assert!(out.found_inf);
    let mut scaler = bf16::scaler();
    scaler.update(true);
    assert_eq!((scaler.scale, scaler.skipped_steps), (0.5, 1));
    // Growth never passes the ceiling of 1.
    let mut scaler = GradScaler {
        growth_interval: 1,
        ..bf16::scaler()
    };
    scaler.update(false);
    assert_eq!(scaler.scale, 1.0);
}

#[test]
fn bf16_cross_entropy_over_a_vocabulary_is_summed_in_f32() {
    // Equal logits over 8,000 classes: the loss is ln 8000 = 8.987. A bf16 sum of the 8,000
    // ones stops growing at 256 (its spacing there is 2), which would read ln 256 = 5.5.
    let dev = Cpu::default();
    let x: Tensor<(usize, Const<8000>), f32, Cpu> = dev.zeros_like(&(4usize, Const));
    let x = x.to_dtype::<bf16>();
    let loss = cross_entropy(x, &[0, 1, 2, 3], Default::default())
        .unwrap()
        .array()
        .to_f32();
    let want = 8000f32.ln();
    assert!(
        (loss - want).abs() <= want * 2f32.powi(-8),
        "{loss} vs {want}"
    );
}
