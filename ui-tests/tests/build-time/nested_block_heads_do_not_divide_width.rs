use neural_arch::prelude::*;

model! {
    /// A block generic in its sizes, as a model file writes it.
    pub struct Block<const D: usize, const H: usize> {
        attn: CausalSelfAttention<D, H>,
    }
    forward(x: [B, T, D]) -> [B, T, D];
}

model! {
    /// The block nested two levels down: its rule is still checked when the top is built.
    pub struct Net<const D: usize, const H: usize> {
        blocks: [Block<D, H>; 2],
    }
    forward(x: [B, T, D]) -> [B, T, D];
}

fn main() {
    let dev = Cpu::default();
    let _ = dev.build_module::<Net<10, 4>, f32>();
}
