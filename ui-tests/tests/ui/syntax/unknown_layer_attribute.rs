use neural_arch::prelude::*;

model! {
    pub struct Net {
        #[rename = "dense"]
        fc: Linear<4, 4>,
    }
}

fn main() {}
