use neural_arch::prelude::*;

model! {
    pub struct Block {
        up: Linear<64, 128>,
    }
    forward(x: [B, 64]) -> [B, 64] {
        x + up(x)
    }
}

fn main() {}
