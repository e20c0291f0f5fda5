use neural_arch::prelude::*;

model! {
    pub struct Block<const D: usize> {
        fc: Linear<D, D>,
    }
    forward(x: [B, D]) -> [B, D];
}

model! {
    pub struct Net {
        block: Block<32>,
    }
    forward(x: [B, 32]) -> [B, 10];
}

fn main() {}
