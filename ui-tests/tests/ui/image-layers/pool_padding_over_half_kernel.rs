use neural_arch::prelude::*;

model! {
    pub struct Cnn {
        pool: MaxPool2d<2, 2, 2>,
    }
    forward(x: [B, 3, 8, 8]) -> [B, 3, 6, 6];
}

fn main() {}
