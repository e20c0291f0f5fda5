use neural_arch::prelude::*;

model! {
    pub struct Block<const D: usize> {
        ln: LayerNorm<D>,
        fc: Linear<D, D>,
    }
    forward(x: [B, D]) -> [B, D] {
        x + fc(ln(x))
    }
}

model! {
    /// Four identical blocks, then a head.
    pub struct Deep<const D: usize> {
        proj: Linear<3, D>,
        blocks: [Block<D>; 4],
        norms: [LayerNorm<D>; 2],
        head: Linear<D, 2>,
    }
    forward(x: [B, 3]) -> [B, 2];
}

pub fn check() {
    let dev = Cpu::default();
    let net = dev.build_module::<Deep<6>, f32>();
    let x: Tensor<Rank2<5, 3>, f32, _> = dev.zeros();
    let y = net.forward(x);
    assert_eq!(y.shape().1, Const::<2>);
    assert_eq!(
        Deep::<6>::PARAMS,
        3 * 6 + 6 + 4 * (12 + 36 + 6) + 2 * 12 + 6 * 2 + 2
    );
}
