use neural_arch::prelude::*;

model! {
    pub struct Mlp {
        fc1: Linear<784, 128>
        fc2: Linear<128, 10>,
    }
}

fn main() {}
