use neural_arch::prelude::*;

model! {
    pub struct Net {
        attn: SelfAttention<8, 2>,
    }
    forward(x: [B, T, 8], mask: bool[B, S]) -> [B, T, 8] {
        attn(x, mask)
    }
}

fn main() {}
