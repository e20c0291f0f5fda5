use neural_arch::prelude::*;

model! {
    pub struct Block {
        ln: LayerNorm<64>,
    }
    forward(x: [B, T, D]) -> [B, T, D];
}

fn main() {}
