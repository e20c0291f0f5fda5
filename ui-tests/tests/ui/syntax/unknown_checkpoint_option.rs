use neural_arch::prelude::*;

model! {
    #[checkpoint(prefix = "transformer.")]
    pub struct Net {
        fc: Linear<4, 4>,
    }
}

fn main() {}
