use neural_arch::prelude::*;

model! {
    pub struct Deep {
        norms: [LayerNorm<32>; 2],
    }
    forward(x: [B, 64]) -> [B, 64];
}

fn main() {}
