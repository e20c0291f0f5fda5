use neural_arch::prelude::*;

model! {
    pub struct Mlp {
        fc1: Linear<784, 10>,
    }
    forward(x: [B, 784]) -> [B, 10] {
        fc1
    }
}

fn main() {}
