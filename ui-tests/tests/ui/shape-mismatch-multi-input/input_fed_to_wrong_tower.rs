use neural_arch::prelude::*;

model! {
    pub struct TwoTower {
        img: Linear<4, 3>,
        txt: Linear<5, 3>,
    }
    forward(a: [B, 4], b: [B, 5]) -> [B, 3] {
        img(b) + txt(b)
    }
}

fn main() {}
