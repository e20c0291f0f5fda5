//! The runtime's integration tests, one module per subject, in one test binary: a binary per
//! file compiled and linked dfdx's kernels and the layers again for each.
//!
//! The `cuda*` modules compare each family of layers on a GPU with the CPU; they are compiled
//! with the `cuda` feature only and need a device to run
//! (`cargo test -p neural-arch --features cuda --test integration cuda`).

mod amp;
mod bf16;
mod composition;
mod dist;
mod recompute;
mod reference_basic;

#[cfg(feature = "cuda")]
mod common;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
mod cuda_attention;
#[cfg(feature = "cuda")]
mod cuda_layers;
#[cfg(feature = "cuda")]
mod cuda_norms;
#[cfg(feature = "cuda")]
mod cuda_optim;
