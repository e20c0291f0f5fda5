use neural_arch::prelude::*;

model! {
    pub struct Cnn {
        conv: Conv2d<1, 8, 3, 1, 1>,
        bn: BatchNorm2d<16>,
    }
    forward(x: [B, 1, 28, 28]) -> [B, 8, 28, 28];
}

fn main() {}
