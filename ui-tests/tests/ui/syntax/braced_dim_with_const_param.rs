use neural_arch::prelude::*;

model! {
    pub struct Mlp<const D: usize> {
        fc1: Linear<D, 10>,
    }
    forward(x: [B, {D * 2}]) -> [B, 10];
}

fn main() {}
