use neural_arch::prelude::*;

model! {
    pub struct Cnn {
        flat: Flatten,
        fc: Linear<15, 10>,
    }
    forward(x: [B, 4, 4]) -> [B, 10];
}

fn main() {}
