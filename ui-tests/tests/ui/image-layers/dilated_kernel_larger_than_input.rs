use neural_arch::prelude::*;

model! {
    pub struct Cnn {
        conv: Conv2d<3, 8, 3, 1, 0, 4>,
    }
    forward(x: [B, 3, 8, 8]) -> [B, 8, 1, 1];
}

fn main() {}
