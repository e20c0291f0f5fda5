use neural_arch::prelude::*;

model! {
    pub struct Encoder {
        attn: SelfAttention<64, 0>,
    }
}

fn main() {}
