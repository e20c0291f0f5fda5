use neural_arch::prelude::*;

model! {
    pub struct Cnn {
        conv: Conv2d<3, 8, 7>,
    }
    forward(x: [B, 3, 5, 5]) -> [B, 8, 1, 1];
}

fn main() {}
