use neural_arch::prelude::*;

model! {
    pub struct Mlp<const D: usize, const F: usize> {
        up: Linear<D, F>,
        down: Linear<F, D>,
    }
    forward(x: [B, D]) -> [B, F];
}

fn main() {}
