use neural_arch::prelude::*;

model! {
    pub struct Lm {
        wte: Embedding<100, 16>,
    }
    forward(x: [B, T, 16]) -> [B, T, 16, 16];
}

fn main() {}
