use neural_arch::prelude::*;

model! {
    pub struct Mlp<const H: usize> where [(); H]: Sized {
        fc1: Linear<784, H>,
        fc2: Linear<H, 10>,
    }
}

fn main() {}
