use neural_arch::prelude::*;

model! {
    pub struct Encoder {
        ln: LayerNorm<100>,
        attn: SelfAttention<100, 3>,
    }
    forward(x: [B, S, 100]) -> [B, S, 100];
}

fn main() {}
