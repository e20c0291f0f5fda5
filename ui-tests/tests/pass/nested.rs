use neural_arch::prelude::*;

model! {
    pub struct Block<const D: usize> {
        ln: LayerNorm<D>,
        fc: Linear<D, D>,
    }
    forward(x: [B, T, D]) -> [B, T, D] {
        x + fc(ln(x))
    }
}

model! {
    /// A nested model, a residual-wrapped nested model, and a chain without a `forward`.
    pub struct Net<const D: usize> {
        proj: Linear<3, D>,
        block: Block<D>,
        res: Residual<Block<D>>,
        head: LinearNoBias<D, 2>,
    }
}

pub fn check() {
    let dev = Cpu::default();
    let net = dev.build_module::<Net<4>, f32>();
    let x: Tensor<Rank3<2, 7, 3>, f32, _> = dev.zeros();
    let y = net.forward(x);
    assert_eq!(y.shape().2, Const::<2>);
}
