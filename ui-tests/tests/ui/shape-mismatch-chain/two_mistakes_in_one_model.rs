use neural_arch::prelude::*;

model! {
    pub struct Mlp {
        fc1: Linear<784, 128>,
        fc2: Linear<256, 64>,
        fc3: Linear<64, 10>,
    }
    forward(x: [B, 784]) -> [B, 20];
}

fn main() {}
