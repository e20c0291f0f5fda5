use neural_arch::prelude::*;

model! {
    pub struct Up {
        fc: Linear<32, 64>,
    }
    forward(x: [B, 32]) -> [B, 64];
}

model! {
    pub struct Net {
        up: Up,
    }
    forward(x: [B, 32]) -> [B, 32] {
        x + up(x)
    }
}

fn main() {}
