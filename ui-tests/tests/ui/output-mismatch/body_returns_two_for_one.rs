use neural_arch::prelude::*;

model! {
    pub struct Heads {
        a: Linear<8, 3>,
        b: Linear<8, 3>,
    }
    forward(x: [B, 8]) -> [B, 3] {
        (a(x), b(x))
    }
}

fn main() {}
