use neural_arch::prelude::*;

model! {
    pub struct Mlp {
        fc1: Linear<784, 10>,
    }
    forward(x: [B, 78.4]) -> [B, 10];
}

fn main() {}
