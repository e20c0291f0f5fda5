use neural_arch::prelude::*;

model! {
    pub struct Encoder {
        attn: SelfAttention<64, 4, 64, 30>,
    }
}

fn main() {}
