use neural_arch::prelude::*;

model! {
    pub struct Cnn {
        flat: Flatten,
        fc: Linear<16, 10>,
    }
    forward(x: [B, 16]) -> [B, 10];
}

fn main() {}
