use neural_arch::prelude::*;

const HIDDEN: usize = 256;

model! {
    pub struct Mlp {
        fc1: Linear<784, 128>,
        fc2: Linear<HIDDEN, 10>,
    }
    forward(x: [B, 784]) -> [B, 10];
}

fn main() {}
