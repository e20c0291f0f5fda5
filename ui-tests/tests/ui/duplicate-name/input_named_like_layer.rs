use neural_arch::prelude::*;

model! {
    pub struct Mlp {
        x: Linear<784, 10>,
    }
    forward(x: [B, 784]) -> [B, 10];
}

fn main() {}
