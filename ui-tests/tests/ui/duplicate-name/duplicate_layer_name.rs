use neural_arch::prelude::*;

model! {
    pub struct Mlp {
        fc: Linear<784, 128>,
        act: ReLU,
        fc: Linear<128, 10>,
    }
}

fn main() {}
