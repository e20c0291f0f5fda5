//! # neural-arch-models
//!
//! Ready-made networks declared with [`neural_arch::model!`], each in its own module:
//!
//! - [`digits`]: [`digits::DigitsMlp`], a small perceptron for the 8×8 UCI handwritten digits.
#![deny(missing_docs)]

pub mod digits;
