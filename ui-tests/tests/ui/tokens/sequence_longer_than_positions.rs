use neural_arch::prelude::*;

model! {
    pub struct Lm {
        wte: Embedding<100, 16>,
        wpe: PositionalEmbedding<64, 16>,
    }
    forward(ids: usize[B, 128]) -> [B, 128, 16];
}

fn main() {}
