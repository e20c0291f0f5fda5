use neural_arch::prelude::*;

model! {
    pub struct Mlp {
        fc: Linear<B, 10>,
    }
    forward(x: [B, 784]) -> [B, 10];
}

fn main() {}
