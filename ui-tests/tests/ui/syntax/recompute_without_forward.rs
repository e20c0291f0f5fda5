use neural_arch::prelude::*;

model! {
    pub struct Net {
        #[recompute]
        fc: Linear<4, 4>,
        act: ReLU,
    }
}

fn main() {}
