use neural_arch::prelude::*;

model! {
    pub struct Merge {
        fc: Linear<4, 3>,
    }
    forward(a: [B, 4], b: [B, 4]) -> [B, 3] {
        let (p, q, r) = (a, b);
        fc(p + q)
    }
}

fn main() {}
