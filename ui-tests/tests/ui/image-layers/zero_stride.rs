use neural_arch::prelude::*;

model! {
    pub struct Cnn {
        conv: Conv2d<1, 8, 3, 0>,
    }
    forward(x: [B, 1, 28, 28]) -> [B, 8, 26, 26];
}

fn main() {}
