use neural_arch::prelude::*;

model! {
    /// Generic sizes: the rule is checked when the model is built with known sizes.
    pub struct Encoder<const D: usize, const H: usize> {
        attn: SelfAttention<D, H>,
    }
    forward(x: [B, S, D]) -> [B, S, D];
}

fn main() {
    let dev = Cpu::default();
    let _ = dev.build_module::<Encoder<10, 4>, f32>();
}
