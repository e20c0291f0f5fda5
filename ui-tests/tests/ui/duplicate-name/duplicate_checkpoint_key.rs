use neural_arch::prelude::*;

model! {
    pub struct Net {
        #[key = "dense"]
        fc1: Linear<4, 4>,
        #[key = "dense"]
        fc2: Linear<4, 2>,
    }
}

fn main() {}
