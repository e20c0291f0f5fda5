//! The error of a model's forward pass.

/// What can go wrong when a model runs: the device failed, or the input is not what the model
/// was declared for, in a way only visible at run time (a token id beyond the vocabulary, an
/// image smaller than a kernel when the sizes are runtime values). The message names the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The device reported an error (out of memory, a failed kernel launch, ...).
    #[error("device error: {0}")]
    Device(String),
    /// A token id at or beyond the vocabulary size reached an embedding.
    #[error(
        "token id {id} at position {position} is out of range for a vocabulary of {vocab} \
         tokens (valid ids are 0..{vocab}); check that the tokenizer and the model agree on the \
         vocabulary size"
    )]
    TokenOutOfRange {
        /// The offending id.
        id: usize,
        /// Its index in the flattened input.
        position: usize,
        /// The embedding's vocabulary size.
        vocab: usize,
    },
    /// A runtime size does not fit a layer (the message says which and why).
    #[error("{0}")]
    Shape(String),
    /// A class target at or beyond the number of classes reached a loss.
    #[error(
        "target {target} at position {position} is out of range for {classes} classes (valid \
         targets are 0..{classes}, or the ignore index); check the labels and the model's \
         number of outputs"
    )]
    TargetOutOfRange {
        /// The offending target.
        target: usize,
        /// Its index in the flattened targets.
        position: usize,
        /// The number of classes (the logits' last dimension).
        classes: usize,
    },
    /// A hyper-parameter is out of its valid range (the message says which and why).
    #[error("{0}")]
    Config(String),
    /// A saved state could not be written, read, or does not fit (the message says why).
    #[error("{0}")]
    Checkpoint(String),
    /// A data-parallel group failed: a rank disagrees, or the engine reported an error (the
    /// message says which).
    #[error("{0}")]
    Distributed(String),
}

impl From<dfdx::tensor::CpuError> for Error {
    fn from(e: dfdx::tensor::CpuError) -> Self {
        Error::Device(e.to_string())
    }
}

#[cfg(feature = "cuda")]
impl From<dfdx::tensor::CudaError> for Error {
    fn from(e: dfdx::tensor::CudaError) -> Self {
        Error::Device(format!("{e:?}"))
    }
}
