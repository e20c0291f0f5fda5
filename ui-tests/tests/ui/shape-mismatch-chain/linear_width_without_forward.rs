use neural_arch::prelude::*;

model! {
    pub struct Mlp {
        fc1: Linear<784, 128>,
        act: ReLU,
        fc2: Linear<256, 10>,
    }
}

fn main() {}
