use neural_arch::prelude::*;

model! {
    pub struct Net {
        res: Residual<Linear<64, 128>>,
        head: Linear<64, 10>,
    }
    forward(x: [B, 64]) -> [B, 10];
}

fn main() {}
