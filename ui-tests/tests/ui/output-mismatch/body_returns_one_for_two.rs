use neural_arch::prelude::*;

model! {
    pub struct Heads {
        a: Linear<8, 3>,
    }
    forward(x: [B, 8]) -> ([B, 3], [B, 3]) {
        a(x)
    }
}

fn main() {}
