use neural_arch::prelude::*;

model! {
    /// A two-layer perceptron with a declared signature.
    pub struct Mlp<const H: usize> {
        fc1: Linear<784, H>,
        act: ReLU,
        fc2: Linear<H, 10>,
    }
    forward(x: [B, 784]) -> [B, 10];
}

pub fn check() {
    let dev = Cpu::default();
    let mlp = dev.build_module::<Mlp<32>, f32>();
    let x: Tensor<(usize, Const<784>), f32, _> = dev.zeros_like(&(4, Const));
    let y = mlp.forward(x);
    assert_eq!(y.shape().0, 4);
    assert_eq!(Mlp::<32>::PARAMS, 784 * 32 + 32 + 32 * 10 + 10);
}
