use neural_arch::prelude::*;

model! {
    pub struct Block<const D: usize> {
        ln: LayerNorm<D>,
        fc: Linear<D, D>,
    }
    forward(x: [B, D]) -> [B, D];
}

model! {
    pub struct Net {
        proj: Linear<10, 32>,
        block: Block<64>,
        head: Linear<64, 2>,
    }
    forward(x: [B, 10]) -> [B, 2];
}

fn main() {}
