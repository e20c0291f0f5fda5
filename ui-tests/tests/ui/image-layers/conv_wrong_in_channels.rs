use neural_arch::prelude::*;

model! {
    pub struct Cnn {
        conv1: Conv2d<1, 8, 3, 1, 1>,
        conv2: Conv2d<16, 8, 3, 1, 1>,
    }
    forward(x: [B, 1, 28, 28]) -> [B, 8, 28, 28];
}

fn main() {}
