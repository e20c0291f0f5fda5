use neural_arch::prelude::*;

model! {
    pub struct Deep {
        blocks: [Linear<64, 128>; 3],
    }
    forward(x: [B, 64]) -> [B, 128];
}

fn main() {}
