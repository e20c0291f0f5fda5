use neural_arch::prelude::*;

model! {
    pub struct Block {
        flat: Flatten,
    }
    forward(x: [B, 4, 4]) -> [B, 16] {
        let f = flat(x);
        f - x
    }
}

fn main() {}
