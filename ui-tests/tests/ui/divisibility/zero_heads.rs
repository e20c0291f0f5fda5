use neural_arch::prelude::*;

model! {
    pub struct Encoder {
        attn: MultiHeadAttention<64, 0>,
    }
}

fn main() {}
