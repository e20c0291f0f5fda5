//! # neural-arch-models
//!
//! Ready-made networks declared with [`neural_arch::model!`], each in its own module:
//!
//! - [`digits`]: [`digits::DigitsMlp`], a small perceptron for the 8×8 UCI handwritten digits.
//! - [`bert`]: BERT, the bidirectional Transformer encoder, with masked-LM and sequence
//!   classification heads (Hugging Face `BertForMaskedLM`, `BertForSequenceClassification`).
//! - [`vit`]: the Vision Transformer for image classification (Hugging Face
//!   `ViTForImageClassification`).
#![deny(missing_docs)]

pub mod bert;
pub mod digits;
pub mod vit;
