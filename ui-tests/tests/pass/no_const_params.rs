use neural_arch::prelude::*;

model! {
    /// A small image classifier: no const parameters, `Flatten` sized by the macro.
    pub struct Cnn {
        flat: Flatten,
        fc1: Linear<{4 * 4}, 8>,
        act: ReLU,
        drop: Dropout<0>,
        fc2: Linear<8, 10>,
        out: LogSoftmax,
    }
    forward(x: [B, 4, 4]) -> [B, 10];
}

pub fn check() {
    let dev = Cpu::default();
    let cnn = dev.build_module::<Cnn, f32>();
    let x: Tensor<Rank3<3, 4, 4>, f32, _> = dev.zeros();
    let y = cnn.forward(x);
    assert_eq!(y.shape().1, Const::<10>);
    assert_eq!(Cnn::PARAMS, 16 * 8 + 8 + 8 * 10 + 10);
}
