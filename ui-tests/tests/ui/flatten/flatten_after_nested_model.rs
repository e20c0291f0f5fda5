use neural_arch::prelude::*;

model! {
    pub struct Stem {
        fc: Linear<4, 4>,
    }
    forward(x: [B, 4, 4]) -> [B, 4, 4];
}

model! {
    pub struct Cnn {
        stem: Stem,
        flat: Flatten,
        fc: Linear<16, 10>,
    }
    forward(x: [B, 4, 4]) -> [B, 10];
}

fn main() {}
