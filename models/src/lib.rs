//! # neural-arch-models
//!
//! Ready-made networks declared with [`neural_arch::model!`], each in its own module:
//!
//! - [`digits`]: [`digits::DigitsMlp`], a small perceptron for the 8×8 UCI handwritten digits.
//! - [`resnet`]: ResNet-18/34/50 as torchvision builds them, and small CIFAR-style ResNets.
#![deny(missing_docs)]

pub mod digits;
pub mod resnet;
