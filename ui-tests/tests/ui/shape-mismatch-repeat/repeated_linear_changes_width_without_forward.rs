use neural_arch::prelude::*;

model! {
    pub struct Deep {
        blocks: [Linear<64, 128>; 2],
    }
}

fn main() {}
