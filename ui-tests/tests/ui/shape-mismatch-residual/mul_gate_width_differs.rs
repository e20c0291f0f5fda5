use neural_arch::prelude::*;

model! {
    pub struct Gated {
        gate: Linear<64, 32>,
        act: Sigmoid,
    }
    forward(x: [B, 64]) -> [B, 64] {
        let g = act(gate(x));
        x * g
    }
}

fn main() {}
