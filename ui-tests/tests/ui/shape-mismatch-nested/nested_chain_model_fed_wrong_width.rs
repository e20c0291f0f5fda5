use neural_arch::prelude::*;

model! {
    pub struct Block<const D: usize> {
        fc: Linear<D, D>,
    }
}

model! {
    pub struct Net {
        proj: Linear<10, 32>,
        block: Block<64>,
    }
    forward(x: [B, 10]) -> [B, 64] {
        block(proj(x))
    }
}

fn main() {}
