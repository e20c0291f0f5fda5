use neural_arch::prelude::*;

model! {
    pub struct Lm {
        wte: Embedding<100, 16>,
        head: Linear<32, 100>,
    }
    forward(ids: usize[B, T]) -> [B, T, 100];
}

fn main() {}
