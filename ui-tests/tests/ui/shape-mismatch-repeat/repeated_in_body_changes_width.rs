use neural_arch::prelude::*;

model! {
    pub struct Deep {
        blocks: [Linear<64, 32>; 2],
    }
    forward(x: [B, 64]) -> [B, 32] {
        blocks(x)
    }
}

fn main() {}
