use neural_arch::prelude::*;

model! {
    pub struct Fuse {
        a: Linear<4, 4>,
        b: Linear<4, 4>,
    }
    forward(x: [B, 4], y: [B, 4]) -> [B, 4] {
        a(x) + b(y)
    }
}

model! {
    pub struct Net {
        up: Linear<4, 8>,
        fuse: Fuse,
    }
    forward(x: [B, 4]) -> [B, 4] {
        fuse(x, up(x))
    }
}

fn main() {}
