use neural_arch::prelude::*;

model! {
    pub struct Mlp {
        fc1: Linear<784, 10>,
    }
    forward() -> [B, 10];
}

fn main() {}
