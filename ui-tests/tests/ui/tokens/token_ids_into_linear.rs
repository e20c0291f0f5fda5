use neural_arch::prelude::*;

model! {
    pub struct Lm {
        head: Linear<16, 100>,
    }
    forward(ids: usize[B, 16]) -> [B, 100];
}

fn main() {}
