use neural_arch::prelude::*;

model! {
    pub struct Net {
        fc: Linear<64, 64>,
        conv: Conv2d<1, 8, 3>,
    }
    forward(x: [B, 64]) -> [B, 8, 6, 6];
}

fn main() {}
