use neural_arch::prelude::*;

model! {
    pub struct Deep {
        blocks: [Linear<64, 64>; 0],
    }
    forward(x: [B, 64]) -> [B, 64];
}

fn main() {}
