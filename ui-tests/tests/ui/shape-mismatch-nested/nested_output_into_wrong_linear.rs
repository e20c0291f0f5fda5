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
        block: Block<32>,
        head: Linear<64, 2>,
    }
    forward(x: [B, 32]) -> [B, 2];
}

fn main() {}
