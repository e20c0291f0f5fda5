use neural_arch::prelude::*;

model! {
    pub struct Mlp<const D: usize> {
        fc: Linear<64, 10>,
    }
    forward(x: [B, D]) -> [B, 10];
}

fn main() {}
