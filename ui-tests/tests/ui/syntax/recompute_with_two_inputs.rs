use neural_arch::prelude::*;

model! {
    pub struct Pair {
        a: Linear<4, 4>,
    }
    forward(x: [B, 4], y: [B, 4]) -> [B, 4] {
        a(x) + a(y)
    }
}

model! {
    pub struct Net {
        #[recompute]
        pair: Pair,
    }
    forward(x: [B, 4]) -> [B, 4] {
        pair(x, x)
    }
}

fn main() {}
