use neural_arch::prelude::*;

model! {
    pub struct Mlp {}
}

fn main() {}
