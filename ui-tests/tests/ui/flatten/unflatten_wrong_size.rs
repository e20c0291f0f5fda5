use neural_arch::prelude::*;

model! {
    pub struct Heads {
        fc: Linear<8, 12>,
        split: Unflatten2<3, 5>,
    }
    forward(x: [B, T, 8]) -> [B, T, 3, 5];
}

fn main() {}
