use neural_arch::prelude::*;

model! {
    pub struct Block<const D: usize> {
        fc: Linear<D, D>,
    }
    forward(x: [B, D]) -> [B, D];
}

model! {
    pub struct Net<const D: usize, const F: usize> {
        up: Linear<D, F>,
        block: Block<D>,
    }
    forward(x: [B, D]) -> [B, F];
}

fn main() {}
