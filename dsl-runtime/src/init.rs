//! Weight initialisation by tensor name, the way Hugging Face's `_init_weights` and nanoGPT's
//! `_init_weights` do it for transformers: the layer defaults (PyTorch's, which dfdx follows)
//! suit small MLPs and CNNs, but a language model whose output layer is tied to an `N(0, 1)`
//! embedding starts with logits of standard deviation `√D` and a loss far above `ln V`.

use crate::Error;
use dfdx::nn::tensor_collection::{
    RecursiveWalker, TensorCollection, TensorOptions, TensorVisitor, ViewTensorMut, ViewTensorName,
};
use dfdx::shapes::{Dtype, HasShape, Shape};
use dfdx::tensor::Tensor;
use dfdx::tensor_ops::Device;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

/// What to do with one tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Leave it as built.
    Keep,
    /// Fill with zeros.
    Zeros,
    /// Fill with ones.
    Ones,
    /// Draw from `N(0, std²)`.
    Normal(f64),
}

/// The transformer rule of GPT-2, BERT, ViT, CLIP and Llama in Hugging Face: matrices
/// (`≥ 2` dimensions) from `N(0, std²)`, biases zero, other vectors (norm weights, class
/// tokens) kept as built.
pub fn transformer_rule(std: f64) -> impl Fn(&str, &[usize]) -> Init {
    move |name, shape| {
        if name.ends_with("bias") {
            Init::Zeros
        } else if shape.len() >= 2 {
            Init::Normal(std)
        } else {
            Init::Keep
        }
    }
}

/// Sets every trainable tensor of `model` by `rule(key, shape)`, drawing normals from a
/// generator seeded with `seed` (the same seed gives the same weights on every device).
pub fn init_weights<E, D, M, R>(model: &mut M, seed: u64, rule: R) -> Result<(), Error>
where
    E: Dtype + num_traits::FromPrimitive,
    D: Device<E>,
    M: TensorCollection<E, D>,
    R: Fn(&str, &[usize]) -> Init,
    Error: From<D::Err>,
{
    struct Walk<R> {
        rule: R,
        rng: rand::rngs::StdRng,
    }
    impl<E: Dtype + num_traits::FromPrimitive, D: Device<E>, R: Fn(&str, &[usize]) -> Init>
        TensorVisitor<E, D> for Walk<R>
    {
        type Viewer = (ViewTensorMut, ViewTensorName);
        type Err = D::Err;
        type E2 = E;
        type D2 = D;
        fn visit<S: Shape>(
            &mut self,
            opts: TensorOptions<S, E, D>,
            (t, name): (&mut Tensor<S, E, D>, String),
        ) -> Result<Option<Tensor<S, E, D>>, Self::Err> {
            if !opts.do_gradient_update {
                return Ok(None);
            }
            let name = name.strip_suffix('.').unwrap_or(&name).to_string();
            let shape: Vec<usize> = t.shape().concrete().into_iter().collect();
            let n = t.shape().num_elements();
            let fill = |v: f64| E::from_f64(v).unwrap_or_default();
            let values: Option<Vec<E>> = match (self.rule)(&name, &shape) {
                Init::Keep => None,
                Init::Zeros => Some(vec![fill(0.0); n]),
                Init::Ones => Some(vec![fill(1.0); n]),
                Init::Normal(std) => Some(
                    (0..n)
                        .map(|_| {
                            let z: f64 = StandardNormal.sample(&mut self.rng);
                            fill(z * std)
                        })
                        .collect(),
                ),
            };
            if let Some(v) = values {
                t.copy_from(&v);
            }
            Ok(None)
        }
    }
    let mut walk = Walk {
        rule,
        rng: rand::rngs::StdRng::seed_from_u64(seed),
    };
    let _ = walk.rng.gen::<u64>();
    M::iter_tensors(&mut RecursiveWalker {
        m: (model, String::new()),
        f: &mut walk,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prelude::*;

    #[test]
    fn matrices_normal_biases_zero_vectors_kept() -> Result<(), Error> {
        let dev = Cpu::default();
        let mut m = dev.build_module::<(Linear<64, 64>, LayerNorm<64>), f64>();
        init_weights(&mut m, 1, transformer_rule(0.02))?;
        let w = m.0.weight.as_vec();
        let std = (w.iter().map(|x| x * x).sum::<f64>() / w.len() as f64).sqrt();
        assert!((std - 0.02).abs() < 0.002, "{std}");
        assert!(m.0.bias.as_vec().iter().all(|&b| b == 0.0));
        assert!(m.1.weight.as_vec().iter().all(|&g| g == 1.0));
        let mut n = dev.build_module::<(Linear<64, 64>, LayerNorm<64>), f64>();
        init_weights(&mut n, 1, transformer_rule(0.02))?;
        assert_eq!(n.0.weight.as_vec(), w, "the seed fixes the weights");
        Ok(())
    }
}
