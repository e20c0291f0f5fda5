use neural_arch::prelude::*;

model! {
    pub struct Mlp {
        fc1: Linear<784, 128>,
        fc2: Linear<128, 10>,
    }
    forward(x: [B, 784]) -> [B, 10] {
        let fc1 = fc1(x);
        fc2(fc1)
    }
}

fn main() {}
