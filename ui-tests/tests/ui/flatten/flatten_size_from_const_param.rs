use neural_arch::prelude::*;

model! {
    pub struct Cnn<const C: usize> {
        flat: Flatten,
        fc: Linear<16, 10>,
    }
    forward(x: [B, C, 4]) -> [B, 10];
}

fn main() {}
