use neural_arch::prelude::*;

model! {
    pub struct Net {
        #[key = "attention.self"]
        attn: Linear<4, 4>,
    }
}

fn main() {}
