use neural_arch::prelude::*;

model! {
    pub struct Block<const D: usize> {
        fc: Linear<D, D>,
    }
    forward(x: [B, D]) -> [B, D];
}

model! {
    pub struct Net {
        proj: Linear<10, 32>,
        block: Block<64>,
    }
    forward(x: [B, 10]) -> [B, 64] {
        let h = proj(x);
        block(h)
    }
}

fn main() {}
