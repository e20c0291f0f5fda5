use neural_arch::prelude::*;

model! {
    pub struct Net {
        #[recompute(every = 2)]
        fc: Linear<4, 4>,
    }
    forward(x: [B, 4]) -> [B, 4];
}

fn main() {}
