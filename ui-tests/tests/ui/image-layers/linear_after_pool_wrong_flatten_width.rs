use neural_arch::prelude::*;

model! {
    pub struct Cnn {
        conv: Conv2d<1, 8, 3, 1, 1>,
        pool: MaxPool2d<2>,
        flat: Flatten,
        fc: Linear<1352, 10>,
    }
    forward(x: [B, 1, 28, 28]) -> [B, 10];
}

fn main() {}
