use neural_arch::prelude::*;

model! {
    pub struct Lm {
        wte: Embedding<100, 16>,
    }
    forward(ids: u32[B, T]) -> [B, T, 16];
}

fn main() {}
