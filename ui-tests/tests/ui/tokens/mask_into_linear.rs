use neural_arch::prelude::*;

model! {
    pub struct Net {
        fc: Linear<8, 8>,
    }
    forward(x: [B, T, 8], mask: bool[B, T]) -> [B, T, 8] {
        fc(mask)
    }
}

fn main() {}
