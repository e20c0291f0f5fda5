use neural_arch::prelude::*;

model! {
    /// A pre-norm MLP block with a residual connection.
    pub struct Block<const D: usize, const F: usize> {
        ln: LayerNorm<D>,
        up: Linear<D, F>,
        act: GeluTanh,
        down: Linear<F, D>,
    }
    forward(x: [B, T, D]) -> [B, T, D] {
        let h = down(act(up(ln(x))));
        x + h
    }
}

pub fn check() {
    let dev = Cpu::default();
    let block = dev.build_module::<Block<8, 16>, f32>();
    let x: Tensor<(usize, usize, Const<8>), f32, _> = dev.zeros_like(&(2, 5, Const));
    let y = block.forward(x);
    assert_eq!(y.shape().1, 5);
}
