use neural_arch::prelude::*;

model! {
    pub struct Net {
        cross: CrossAttention<8, 2>,
    }
    forward(x: [B, T, 8]) -> [B, T, 8] {
        cross(x)
    }
}

fn main() {}
