//! ResNet (He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition",
//! <https://arxiv.org/abs/1512.03385>): a convolutional image classifier made of stages of
//! residual blocks, `y = relu(x + F(x))`, where `F` is two 3×3 convolutions (the *basic* block
//! of ResNet-18/34) or a 1×1-3×3-1×1 *bottleneck* (ResNet-50/101/152); the first block of a
//! stage halves the image and widens the channels, and its shortcut is then a strided 1×1
//! convolution with batch norm (the *downsample* branch, option B of the paper).
//!
//! This file matches torchvision's `torchvision.models.resnet18` / `resnet50` (classes
//! `ResNet`, `BasicBlock`, `Bottleneck`): the same layers, the same `state_dict` keys
//! (`conv1.weight`, `bn1.*`, `layer2.0.downsample.0.weight`, `layer2.0.downsample.1.*`,
//! `fc.*`), and torchvision's *ResNet v1.5*: the stride of a bottleneck sits on its 3×3
//! convolution, not on the first 1×1 as in the paper. Convolutions have no bias (batch norm
//! follows each). torchvision's files also hold `num_batches_tracked` for every batch norm; it
//! only matters for `momentum=None` and is skipped when loading.
//!
//! Batch norm behaves as in PyTorch: `forward` (inference) is `model.eval()`, normalising with
//! the running statistics; `forward_mut` (training) is `model.train()`, normalising with the
//! batch's statistics and updating the running ones.
//!
//! Freshly built weights follow PyTorch's default initialisers (convolutions and `fc` uniform
//! in ±1/√fan-in, batch norm 1 and 0), not torchvision's Kaiming-normal (fan-out) for
//! convolutions; loaded checkpoints are unaffected.
//!
//! Image sizes are part of the types (every spatial size is checked when the layers run), so a
//! preset is for one input size: [`ResNet18`] and [`ResNet50`] take 224×224 images.
//!
//! ```
//! use neural_arch::prelude::*;
//! use neural_arch_models::resnet::{ResNet18, ResNetParity};
//!
//! assert_eq!(ResNet18::PARAMS, 11_689_512); // torchvision's count, a compile-time constant
//! let dev = Cpu::default();
//! let model = dev.build_module::<ResNetParity, f32>();
//! let x: Tensor<Rank4<2, 3, 24, 24>, f32, _> = dev.sample_normal();
//! let logits = model.forward(x); // evaluation mode: running statistics
//! assert_eq!(logits.shape(), &(Const::<2>, Const::<5>));
//! ```

use neural_arch::layers::LayerInfo;
use neural_arch::prelude::*;
use neural_arch::{Error, SummaryRow};
use std::marker::PhantomData;

// ---------------------------------------------------------------------------------------------
// Blocks
// ---------------------------------------------------------------------------------------------

model! {
    /// torchvision's `BasicBlock` without a downsample branch: `C` channels in and out on a
    /// `HW`×`HW` image, `relu(x + bn2(conv2(relu(bn1(conv1(x))))))`, both convolutions 3×3,
    /// stride 1, padding 1, no bias.
    pub struct BasicBlock<const C: usize, const HW: usize> {
        conv1: Conv2d<C, C, 3, 1, 1, 1, 1, false, Const<HW>, Const<HW>>,
        bn1: BatchNorm2d<C>,
        relu: ReLU,
        conv2: Conv2d<C, C, 3, 1, 1, 1, 1, false, Const<HW>, Const<HW>>,
        bn2: BatchNorm2d<C>,
    }
    forward(x: [B, C, HW, HW]) -> [B, C, HW, HW] {
        let y = bn2(conv2(relu(bn1(conv1(x)))));
        relu(x + y)
    }
}

model! {
    /// The shortcut of a block that changes the shape: a 1×1 convolution with stride `S`
    /// (no bias) and a batch norm, keyed `downsample.0` and `downsample.1` as torchvision's
    /// `nn.Sequential(conv1x1(CI, CO, S), BatchNorm2d(CO))`. `HO` is the output size.
    pub struct Downsample<const CI: usize, const CO: usize, const S: usize, const HO: usize> {
        #[key = "0"]
        conv: Conv2d<CI, CO, 1, S, 0, 1, 1, false, Const<HO>, Const<HO>>,
        #[key = "1"]
        bn: BatchNorm2d<CO>,
    }
}

model! {
    /// torchvision's `BasicBlock` with a downsample branch, the first block of ResNet-18/34's
    /// stages 2-4: `CI` → `CO` channels, `HI`×`HI` → `HO`×`HO` (`HO = (HI - 1) / S + 1`), the
    /// stride `S` on `conv1`; `relu(downsample(x) + bn2(conv2(relu(bn1(conv1(x))))))`.
    pub struct BasicDownBlock<
        const CI: usize,
        const CO: usize,
        const S: usize,
        const HI: usize,
        const HO: usize
    > {
        conv1: Conv2d<CI, CO, 3, S, 1, 1, 1, false, Const<HO>, Const<HO>>,
        bn1: BatchNorm2d<CO>,
        relu: ReLU,
        conv2: Conv2d<CO, CO, 3, 1, 1, 1, 1, false, Const<HO>, Const<HO>>,
        bn2: BatchNorm2d<CO>,
        downsample: Downsample<CI, CO, S, HO>,
    }
    forward(x: [B, CI, HI, HI]) -> [B, CO, HO, HO] {
        let y = bn2(conv2(relu(bn1(conv1(x)))));
        relu(downsample(x) + y)
    }
}

model! {
    /// torchvision's `Bottleneck` without a downsample branch: `C` channels in and out, `M`
    /// inside (`C = 4·M` in ResNet-50), on a `HW`×`HW` image:
    /// `relu(x + bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))))` with `conv1` 1×1 `C → M`,
    /// `conv2` 3×3 `M → M`, `conv3` 1×1 `M → C`.
    pub struct Bottleneck<const C: usize, const M: usize, const HW: usize> {
        conv1: Conv2d<C, M, 1, 1, 0, 1, 1, false, Const<HW>, Const<HW>>,
        bn1: BatchNorm2d<M>,
        conv2: Conv2d<M, M, 3, 1, 1, 1, 1, false, Const<HW>, Const<HW>>,
        bn2: BatchNorm2d<M>,
        conv3: Conv2d<M, C, 1, 1, 0, 1, 1, false, Const<HW>, Const<HW>>,
        bn3: BatchNorm2d<C>,
        relu: ReLU,
    }
    forward(x: [B, C, HW, HW]) -> [B, C, HW, HW] {
        let y = relu(bn1(conv1(x)));
        let y = relu(bn2(conv2(y)));
        relu(x + bn3(conv3(y)))
    }
}

model! {
    /// torchvision's `Bottleneck` with a downsample branch, the first block of every
    /// ResNet-50 stage: `CI` → `CO` channels (`M` inside), `HI` → `HO`, the stride `S` on the
    /// 3×3 `conv2` (ResNet v1.5) and on the downsample's 1×1 convolution.
    pub struct BottleneckDownBlock<
        const CI: usize,
        const M: usize,
        const CO: usize,
        const S: usize,
        const HI: usize,
        const HO: usize
    > {
        conv1: Conv2d<CI, M, 1, 1, 0, 1, 1, false, Const<HI>, Const<HI>>,
        bn1: BatchNorm2d<M>,
        conv2: Conv2d<M, M, 3, S, 1, 1, 1, false, Const<HO>, Const<HO>>,
        bn2: BatchNorm2d<M>,
        conv3: Conv2d<M, CO, 1, 1, 0, 1, 1, false, Const<HO>, Const<HO>>,
        bn3: BatchNorm2d<CO>,
        relu: ReLU,
        downsample: Downsample<CI, CO, S, HO>,
    }
    forward(x: [B, CI, HI, HI]) -> [B, CO, HO, HO] {
        let y = relu(bn1(conv1(x)));
        let y = relu(bn2(conv2(y)));
        relu(downsample(x) + bn3(conv3(y)))
    }
}

// ---------------------------------------------------------------------------------------------
// Stages
// ---------------------------------------------------------------------------------------------

/// A ResNet stage as torchvision's `_make_layer` builds it: `nn.Sequential(first, *rest)`, a
/// first block `F` (which may change the shape) followed by `REST` identical blocks `Blk`,
/// keyed `0`, `1`, ..., `REST` (`layer2.0.conv1.weight`, `layer2.1.bn2.bias`).
///
/// The DSL's `[Blk; N]` repeats identical blocks only; a stage's first block differs, hence
/// this layer.
///
/// # Shapes
/// Whatever `F` takes; `Blk` must keep `F`'s output shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stage<F, Blk, const REST: usize>(PhantomData<(F, Blk)>);

impl<F, Blk, const REST: usize> Default for Stage<F, Blk, REST> {
    fn default() -> Self {
        Stage(PhantomData)
    }
}

/// The built [`Stage`].
#[derive(Debug, Clone)]
pub struct StageModule<F, Blk, const REST: usize> {
    /// Block `0`.
    pub first: F,
    /// Blocks `1..=REST`.
    pub rest: Vec<Blk>,
}

impl<F: LayerInfo, Blk: LayerInfo, const REST: usize> LayerInfo for Stage<F, Blk, REST> {
    const PARAMS: usize = F::PARAMS + REST * Blk::PARAMS;
    fn children(prefix: &str, depth: usize) -> Vec<SummaryRow> {
        let mut rows = F::children(&format!("{prefix}.0"), depth);
        if REST > 0 {
            rows.extend(Blk::children(&format!("{prefix}.1"), depth));
        }
        if REST > 1 {
            rows.push(SummaryRow {
                depth,
                name: format!("{prefix}.2..{REST}"),
                layer: format!("{} more, same as {prefix}.1", REST - 1),
                output: String::new(),
                params: (REST - 1) * Blk::PARAMS,
            });
        }
        rows
    }
}

impl<
        E: Dtype,
        D: Device<E>,
        F: BuildOnDevice<D, E>,
        Blk: BuildOnDevice<D, E>,
        const REST: usize,
    > BuildOnDevice<D, E> for Stage<F, Blk, REST>
where
    StageModule<F::Built, Blk::Built, REST>: BuildModule<D, E>,
{
    type Built = StageModule<F::Built, Blk::Built, REST>;
}

impl<E: Dtype, D: Device<E>, F, Blk, const REST: usize> TensorCollection<E, D>
    for StageModule<F, Blk, REST>
where
    F: TensorCollection<E, D>,
    Blk: TensorCollection<E, D>,
{
    type To<E2: Dtype, D2: Device<E2>> = StageModule<F::To<E2, D2>, Blk::To<E2, D2>, REST>;

    fn iter_tensors<V: neural_arch::dfdx::nn::ModuleVisitor<Self, E, D>>(
        visitor: &mut V,
    ) -> Result<Option<Self::To<V::E2, V::D2>>, V::Err> {
        let names: Vec<String> = (1..=REST).map(|i| i.to_string()).collect();
        visitor.visit_fields(
            (
                Self::module("0", |s| &s.first, |s| &mut s.first),
                names
                    .iter()
                    .enumerate()
                    .map(|(i, name)| {
                        Self::module(name, move |s| &s.rest[i], move |s| &mut s.rest[i])
                    })
                    .collect::<Vec<_>>(),
            ),
            |(first, rest)| StageModule { first, rest },
        )
    }
}

impl<X, F, Blk, const REST: usize> Module<X> for StageModule<F, Blk, REST>
where
    F: Module<X>,
    F::Error: Into<Error>,
    Blk: Module<F::Output, Output = F::Output>,
    Blk::Error: Into<Error>,
{
    type Output = F::Output;
    type Error = Error;

    fn try_forward(&self, x: X) -> Result<Self::Output, Error> {
        let mut x = self.first.try_forward(x).map_err(Into::into)?;
        for b in &self.rest {
            x = b.try_forward(x).map_err(Into::into)?;
        }
        Ok(x)
    }
}

impl<X, F, Blk, const REST: usize> ModuleMut<X> for StageModule<F, Blk, REST>
where
    F: ModuleMut<X>,
    F::Error: Into<Error>,
    Blk: ModuleMut<F::Output, Output = F::Output>,
    Blk::Error: Into<Error>,
{
    type Output = F::Output;
    type Error = Error;

    fn try_forward_mut(&mut self, x: X) -> Result<Self::Output, Error> {
        let mut x = self.first.try_forward_mut(x).map_err(Into::into)?;
        for b in &mut self.rest {
            x = b.try_forward_mut(x).map_err(Into::into)?;
        }
        Ok(x)
    }
}

// ---------------------------------------------------------------------------------------------
// Networks
// ---------------------------------------------------------------------------------------------

model! {
    /// ResNet with basic blocks and torchvision's ImageNet stem (ResNet-18/34):
    /// `conv1` 7×7/2 (pad 3, no bias), `bn1`, `relu`, `maxpool` 3×3/2 (pad 1), four stages,
    /// global average pooling and the classifier `fc`.
    ///
    /// - `W1..W4`: stage widths (64, 128, 256, 512); the stem has `W1` channels.
    /// - `N1`: blocks of stage 1 (2 for ResNet-18, 3 for ResNet-34); `R2..R4`: blocks of stages
    ///   2-4 after the first (1, 1, 1 for ResNet-18; 3, 5, 2 for ResNet-34).
    /// - `IMG`: input height and width (224); `H0 = IMG/2` after `conv1`, `H1 = H0/2` after
    ///   `maxpool` and in stage 1, `H2`, `H3`, `H4` halving again (112, 56, 28, 14, 7), each
    ///   rounded up as a stride-2 convolution does (checked when the layers run).
    /// - `NC`: classes (1000).
    #[checkpoint(ignored("num_batches_tracked"))]
    pub struct ResNetBasic<
        const W1: usize, const W2: usize, const W3: usize, const W4: usize,
        const N1: usize, const R2: usize, const R3: usize, const R4: usize,
        const IMG: usize, const H0: usize, const H1: usize, const H2: usize, const H3: usize,
        const H4: usize, const NC: usize
    > {
        conv1: Conv2d<3, W1, 7, 2, 3, 1, 1, false, Const<H0>, Const<H0>>,
        bn1: BatchNorm2d<W1>,
        relu: ReLU,
        maxpool: MaxPool2d<3, 2, 1, Const<H1>, Const<H1>>,
        layer1: [BasicBlock<W1, H1>; N1],
        layer2: Stage<BasicDownBlock<W1, W2, 2, H1, H2>, BasicBlock<W2, H2>, R2>,
        layer3: Stage<BasicDownBlock<W2, W3, 2, H2, H3>, BasicBlock<W3, H3>, R3>,
        layer4: Stage<BasicDownBlock<W3, W4, 2, H3, H4>, BasicBlock<W4, H4>, R4>,
        avgpool: GlobalAvgPool,
        fc: Linear<W4, NC>,
    }
    forward(x: [B, 3, IMG, IMG]) -> [B, NC];
}

model! {
    /// ResNet with bottleneck blocks (v1.5) and the ImageNet stem (ResNet-50/101/152): as
    /// [`ResNetBasic`], with stage `k`'s blocks `Mk` wide inside and `Ok` wide outside
    /// (`Ok = 4·Mk`: 256, 512, 1024, 2048 around 64, 128, 256, 512); the stem has `M1`
    /// channels. `R1..R4`: blocks of each stage after its first (2, 3, 5, 2 for ResNet-50).
    /// Every stage starts with a downsample block (stage 1's keeps the size, stride 1).
    #[checkpoint(ignored("num_batches_tracked"))]
    pub struct ResNetBottleneck<
        const M1: usize, const M2: usize, const M3: usize, const M4: usize,
        const O1: usize, const O2: usize, const O3: usize, const O4: usize,
        const R1: usize, const R2: usize, const R3: usize, const R4: usize,
        const IMG: usize, const H0: usize, const H1: usize, const H2: usize, const H3: usize,
        const H4: usize, const NC: usize
    > {
        conv1: Conv2d<3, M1, 7, 2, 3, 1, 1, false, Const<H0>, Const<H0>>,
        bn1: BatchNorm2d<M1>,
        relu: ReLU,
        maxpool: MaxPool2d<3, 2, 1, Const<H1>, Const<H1>>,
        layer1: Stage<BottleneckDownBlock<M1, M1, O1, 1, H1, H1>, Bottleneck<O1, M1, H1>, R1>,
        layer2: Stage<BottleneckDownBlock<O1, M2, O2, 2, H1, H2>, Bottleneck<O2, M2, H2>, R2>,
        layer3: Stage<BottleneckDownBlock<O2, M3, O3, 2, H2, H3>, Bottleneck<O3, M3, H3>, R3>,
        layer4: Stage<BottleneckDownBlock<O3, M4, O4, 2, H3, H4>, Bottleneck<O4, M4, H4>, R4>,
        avgpool: GlobalAvgPool,
        fc: Linear<O4, NC>,
    }
    forward(x: [B, 3, IMG, IMG]) -> [B, NC];
}

model! {
    /// ResNet with basic blocks and the CIFAR stem of the paper's §4.2 (small images): `conv1`
    /// 3×3, stride 1, padding 1 (no bias), `bn1`, `relu`, no max pooling, three stages of
    /// widths `W1..W3` on `IMG`, `H2 = IMG/2`, `H3 = H2/2`, global average pooling, `fc`.
    /// `N1`: blocks of stage 1, `R2`, `R3`: blocks of stages 2-3 after the first. Keys as
    /// torchvision's (`conv1`, `bn1`, `layer1..3`, `fc`).
    #[checkpoint(ignored("num_batches_tracked"))]
    pub struct ResNetCifar<
        const W1: usize, const W2: usize, const W3: usize,
        const N1: usize, const R2: usize, const R3: usize,
        const IMG: usize, const H2: usize, const H3: usize, const NC: usize
    > {
        conv1: Conv2d<3, W1, 3, 1, 1, 1, 1, false, Const<IMG>, Const<IMG>>,
        bn1: BatchNorm2d<W1>,
        relu: ReLU,
        layer1: [BasicBlock<W1, IMG>; N1],
        layer2: Stage<BasicDownBlock<W1, W2, 2, IMG, H2>, BasicBlock<W2, H2>, R2>,
        layer3: Stage<BasicDownBlock<W2, W3, 2, H2, H3>, BasicBlock<W3, H3>, R3>,
        avgpool: GlobalAvgPool,
        fc: Linear<W3, NC>,
    }
    forward(x: [B, 3, IMG, IMG]) -> [B, NC];
}

// ---------------------------------------------------------------------------------------------
// Presets
// ---------------------------------------------------------------------------------------------

/// ResNet-18 (torchvision `resnet18`): basic blocks [2, 2, 2, 2], widths 64-512, 224×224
/// images, 1000 classes; 11 689 512 parameters.
pub type ResNet18 = ResNetBasic<64, 128, 256, 512, 2, 1, 1, 1, 224, 112, 56, 28, 14, 7, 1000>;

/// ResNet-34 (torchvision `resnet34`): basic blocks [3, 4, 6, 3]; 21 797 672 parameters.
pub type ResNet34 = ResNetBasic<64, 128, 256, 512, 3, 3, 5, 2, 224, 112, 56, 28, 14, 7, 1000>;

/// ResNet-50 (torchvision `resnet50`, v1.5): bottleneck blocks [3, 4, 6, 3], 224×224 images,
/// 1000 classes; 25 557 032 parameters.
pub type ResNet50 = ResNetBottleneck<
    64,
    128,
    256,
    512,
    256,
    512,
    1024,
    2048,
    2,
    3,
    5,
    2,
    224,
    112,
    56,
    28,
    14,
    7,
    1000,
>;

/// A small CIFAR-style ResNet for 32×32 3-channel images and 10 classes (Fashion-MNIST padded
/// to 32×32 and repeated over 3 channels, or CIFAR-10): widths 16/32/64, one basic block per
/// stage, 78 042 parameters. A training step (forward, backward, Adam) on 64 images takes about
/// 1 s on 2 shared CPU cores (test profile): an epoch of Fashion-MNIST in about 15 minutes, a
/// few hundred steps in a few.
pub type ResNetTiny = ResNetCifar<16, 32, 64, 1, 0, 0, 32, 16, 8, 10>;

/// The parity-test preset: [`ResNetBasic`] (the ResNet-18 structure: [2, 2, 2, 2] blocks,
/// every downsample kind) with widths 4/8/8/16, 24×24 images (12, 6, 3, 2, 1 after the stem
/// and each stage: odd sizes too), 5 classes.
pub type ResNetParity = ResNetBasic<4, 8, 8, 16, 2, 1, 1, 1, 24, 12, 6, 3, 2, 1, 5>;

/// The bottleneck parity-test preset: [`ResNetBottleneck`] with blocks [1, 2, 1, 1], widths
/// 4/8/8/8 inside and 16/32/32/32 outside, 24×24 images, 5 classes.
pub type ResNetParityBottleneck =
    ResNetBottleneck<4, 8, 8, 8, 16, 32, 32, 32, 0, 1, 0, 0, 24, 12, 6, 3, 2, 1, 5>;

const _: () = assert!(ResNet18::PARAMS == 11_689_512);
const _: () = assert!(ResNet34::PARAMS == 21_797_672);
const _: () = assert!(ResNet50::PARAMS == 25_557_032);

/// Every preset with its summary, for `model-summary`.
pub const PRESETS: crate::Presets = &[
    ("tiny", ResNetTiny::summary),
    ("parity", ResNetParity::summary),
    ("parity-bottleneck", ResNetParityBottleneck::summary),
    ("18", ResNet18::summary),
    ("34", ResNet34::summary),
    ("50", ResNet50::summary),
];

// ---------------------------------------------------------------------------------------------
// Heads
// ---------------------------------------------------------------------------------------------

/// Class probabilities from logits `[B, NC]`: a softmax over the classes.
pub fn probabilities<B: Dim, const NC: usize, E: Dtype, D: Device<E>, T: Tape<E, D>>(
    logits: Tensor<(B, Const<NC>), E, D, T>,
) -> Result<Tensor<(B, Const<NC>), E, D, T>, Error>
where
    Error: From<D::Err>,
{
    Ok(logits.try_softmax::<Axis<1>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_params_equal_the_built_count() {
        let dev = Cpu::default();
        let m = dev.build_module::<ResNetParity, f32>();
        assert_eq!(ResNetParity::PARAMS, m.num_trainable_params());
        assert_eq!(ResNetParity::PARAMS, 14_217, "torchvision's count");
        let m = dev.build_module::<ResNetParityBottleneck, f32>();
        assert_eq!(ResNetParityBottleneck::PARAMS, m.num_trainable_params());
        assert_eq!(ResNetParityBottleneck::PARAMS, 8_489, "torchvision's count");
        let m = dev.build_module::<ResNetTiny, f32>();
        assert_eq!(ResNetTiny::PARAMS, m.num_trainable_params());
        assert_eq!(ResNetTiny::PARAMS, 78_042);
    }

    #[test]
    fn keys_are_torchvisions() {
        let dev = Cpu::default();
        let m = dev.build_module::<ResNetParity, f32>();
        let names = neural_arch::checkpoint::tensor_names(&m);
        for k in [
            "conv1.weight",
            "bn1.running_var",
            "layer1.1.conv2.weight",
            "layer2.0.downsample.0.weight",
            "layer2.0.downsample.1.running_mean",
            "layer4.1.bn2.bias",
            "fc.weight",
        ] {
            assert!(names.iter().any(|n| n == k), "{k} missing from {names:?}");
        }
        assert!(!names
            .iter()
            .any(|n| n.contains("relu") || n.contains("conv1.bias")));
    }

    #[test]
    fn both_modes_run_and_training_updates_running_stats() {
        let dev = Cpu::seed_from_u64(0);
        let mut m = dev.build_module::<ResNetTiny, f32>();
        let x: Tensor<Rank4<2, 3, 32, 32>, f32, _> = dev.sample_normal();
        let y = m.forward(x.clone());
        assert_eq!(y.shape(), &(Const::<2>, Const::<10>));
        let before = m.bn1.running_mean.as_vec();
        let y = m.forward_mut(x);
        assert_eq!(y.shape(), &(Const::<2>, Const::<10>));
        assert_ne!(before, m.bn1.running_mean.as_vec());
        let p = probabilities(y).unwrap();
        for row in p.array() {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn summary_lists_the_stages() {
        let s = ResNet18::summary();
        let names: Vec<&str> = s.rows.iter().map(|r| r.name.as_str()).collect();
        assert!(names.contains(&"layer2.0.downsample"), "{names:?}");
        assert_eq!(s.total_params, 11_689_512);
    }
}
