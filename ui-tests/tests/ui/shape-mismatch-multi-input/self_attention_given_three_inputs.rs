use neural_arch::prelude::*;

model! {
    pub struct Decoder {
        attn: SelfAttention<8, 2>,
    }
    forward(q: [B, S, 8], kv: [B, T, 8]) -> [B, S, 8] {
        attn(q, kv, kv)
    }
}

fn main() {}
