use neural_arch::prelude::*;

model! {
    pub struct Up {
        fc: Linear<64, 128>,
    }
    forward(x: [B, 64]) -> [B, 128];
}

model! {
    pub struct Deep {
        blocks: [Up; 2],
    }
    forward(x: [B, 64]) -> [B, 128];
}

fn main() {}
