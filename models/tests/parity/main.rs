//! The models against their PyTorch references (one module per architecture, each named in
//! `tools/reference/README.md`), and the standard presets built through every compile-time
//! check. One test binary, not one per file: the models, dfdx's f64 kernels and the checkpoint
//! code are compiled and linked once.

mod common;

mod bert;
mod clip;
mod gpt2;
mod llama;
mod resnet;
mod standard_presets;
mod vit;
