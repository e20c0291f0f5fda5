use neural_arch::prelude::*;

model! {
    pub struct Merge {
        fc: Linear<4, 3>,
    }
    forward(x: [B, 4], x: [B, 4]) -> [B, 3] {
        fc(x)
    }
}

fn main() {}
