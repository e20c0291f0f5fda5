use neural_arch::prelude::*;

model! {
    pub struct Mlp {
        fc1: Linear<784, 784>,
    }
    forward(x: [B, 784]) -> [B, 784] {
        x / fc1(x)
    }
}

fn main() {}
