use neural_arch::prelude::*;

model! {
    pub struct Mlp {
        fc1: Linear<784, 10>,
        fc2: Linear<784, 10>,
    }
    forward(x: [B, 784]) -> [B, 10] {
        if true { fc1(x) } else { fc2(x) }
    }
}

fn main() {}
