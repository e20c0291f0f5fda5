use neural_arch::prelude::*;

model! {
    pub struct Mlp<const fc: usize> {
        fc: Linear<784, 10>,
    }
}

fn main() {}
