//! # neural-arch-models
//!
//! Ready-made networks declared with [`neural_arch::model!`], each in its own module:
//!
//! - [`digits`]: [`digits::DigitsMlp`], a small perceptron for the 8×8 UCI handwritten digits.
//! - [`resnet`]: ResNet-18/34/50 as torchvision builds them, and small CIFAR-style ResNets.
//! - [`clip`]: CLIP as Hugging Face's `CLIPModel`: a causal text and a ViT image transformer.
#![deny(missing_docs)]

pub mod clip;
pub mod digits;
pub mod resnet;

/// The presets of one architecture: each name with its layer table.
pub type Presets = &'static [(&'static str, fn() -> neural_arch::Summary)];

/// Every architecture of this crate with its presets, for `model-summary` and the trainers.
pub const ARCHITECTURES: &[(&str, Presets)] = &[
    ("digits", digits::PRESETS),
    ("resnet", resnet::PRESETS),
    ("clip", clip::PRESETS),
];
