use neural_arch::prelude::*;

model! {
    pub struct Deep {
        flat: [Flatten; 2],
    }
    forward(x: [B, 4, 4]) -> [B, 16];
}

fn main() {}
