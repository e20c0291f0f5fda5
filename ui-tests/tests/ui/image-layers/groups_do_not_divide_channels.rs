use neural_arch::prelude::*;

model! {
    pub struct Cnn {
        conv: Conv2d<6, 8, 3, 1, 1, 1, 4>,
    }
    forward(x: [B, 6, 8, 8]) -> [B, 8, 8, 8];
}

fn main() {}
