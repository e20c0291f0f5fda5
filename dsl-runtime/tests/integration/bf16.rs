//! `bf16`, the element type the vendored dfdx gains (vendor/dfdx/PATCHED.md): its matrix
//! products accumulate in `f32`, and the cross-entropy over a large vocabulary does not stall.
//! (Mixed precision in `bf16` is tested in `amp.rs`.)

use neural_arch::dfdx::dtypes::bf16;
use neural_arch::prelude::*;

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
