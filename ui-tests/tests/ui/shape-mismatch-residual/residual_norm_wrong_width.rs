use neural_arch::prelude::*;

model! {
    pub struct Net {
        res: Residual<LayerNorm<32>>,
    }
    forward(x: [B, 64]) -> [B, 64];
}

fn main() {}
