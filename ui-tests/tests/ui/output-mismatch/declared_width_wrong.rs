use neural_arch::prelude::*;

model! {
    pub struct Mlp {
        fc1: Linear<784, 128>,
        act: ReLU,
        fc2: Linear<128, 20>,
    }
    forward(x: [B, 784]) -> [B, 10];
}

fn main() {}
