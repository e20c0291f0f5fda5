//! # neural-arch-models
//!
//! Ready-made networks declared with [`neural_arch::model!`], each in its own module:
//!
//! - [`digits`]: [`digits::DigitsMlp`], a small perceptron for the 8×8 UCI handwritten digits.
//! - [`gpt2`]: [`gpt2::Gpt2LMHeadModel`], GPT-2 with Hugging Face's keys, and KV-cached generation.
//! - [`llama`]: [`llama::LlamaForCausalLM`], a Llama-style transformer (RoPE, GQA, SwiGLU, RMSNorm).
//! - [`generate`]: temperature/top-k sampling and the generation loop the language models share.
//! - [`bert`]: BERT, the bidirectional Transformer encoder, with masked-LM and sequence
//!   classification heads (Hugging Face `BertForMaskedLM`, `BertForSequenceClassification`).
//! - [`vit`]: the Vision Transformer for image classification (Hugging Face
//!   `ViTForImageClassification`).
//! - [`resnet`]: ResNet-18/34/50 as torchvision builds them, and small CIFAR-style ResNets.
//! - [`clip`]: CLIP as Hugging Face's `CLIPModel`: a causal text and a ViT image transformer.
#![deny(missing_docs)]

pub mod bert;
pub mod clip;
pub mod digits;
pub mod generate;
pub mod gpt2;
pub mod llama;
pub mod resnet;
pub mod vit;

/// The presets of one architecture: each name with its layer table.
pub type Presets = &'static [(&'static str, fn() -> neural_arch::Summary)];

/// Every architecture of this crate with its presets, for `model-summary` and the trainers.
pub const ARCHITECTURES: &[(&str, Presets)] = &[
    ("gpt2", gpt2::PRESETS),
    ("llama", llama::PRESETS),
    ("bert", bert::PRESETS),
    ("vit", vit::PRESETS),
    ("clip", clip::PRESETS),
    ("resnet", resnet::PRESETS),
    ("digits", digits::PRESETS),
];
