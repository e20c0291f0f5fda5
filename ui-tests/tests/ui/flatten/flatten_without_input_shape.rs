use neural_arch::prelude::*;

model! {
    pub struct Cnn {
        flat: Flatten,
        fc: Linear<16, 10>,
    }
}

fn main() {}
