//! A multilayer perceptron for the 8×8 handwritten digits of the UCI
//! "Optical Recognition of Handwritten Digits" data set (the one scikit-learn ships as
//! `load_digits`): 64 pixel intensities in, 10 class logits out.

use neural_arch::prelude::*;

/// Number of input features: an 8×8 image, flattened row by row.
pub const INPUTS: usize = 64;
/// Number of classes: the digits 0 to 9.
pub const CLASSES: usize = 10;

model! {
    /// A two-layer perceptron for 8×8 digits with `H` hidden units:
    /// `Linear<64, H>`, ReLU, 10 % dropout (training only), `Linear<H, 10>`.
    ///
    /// The output is unnormalised logits; train it with
    /// `cross_entropy_with_logits_loss` and predict with an argmax.
    ///
    /// ```
    /// use neural_arch::prelude::*;
    /// use neural_arch_models::digits::DigitsMlp;
    ///
    /// let dev = Cpu::default();
    /// let mlp = dev.build_module::<DigitsMlp<32>, f32>();
    /// let x: Tensor<Rank2<4, 64>, f32, _> = dev.zeros();
    /// assert_eq!(mlp.forward(x).shape().1, Const::<10>);
    /// assert_eq!(DigitsMlp::<32>::PARAMS, 64 * 32 + 32 + 32 * 10 + 10);
    /// ```
    pub struct DigitsMlp<const H: usize> {
        fc1: Linear<64, H>,
        act: ReLU,
        drop: Dropout<10>,
        fc2: Linear<H, 10>,
    }
    forward(x: [B, 64]) -> [B, 10];
}

model! {
    /// A small CNN for the digits enlarged to 32×32: two conv-batchnorm-relu-pool stages and a
    /// linear classifier, every spatial size computed by the DSL (32 → 16 → 8, flattened to
    /// 32·8·8 = 2048).
    pub struct DigitsCnn {
        conv1: Conv2d<1, 16, 3, 1, 1>,
        bn1: BatchNorm2d<16>,
        act1: ReLU,
        pool1: MaxPool2d<2>,
        conv2: Conv2d<16, 32, 3, 1, 1>,
        bn2: BatchNorm2d<32>,
        act2: ReLU,
        pool2: MaxPool2d<2>,
        flat: Flatten,
        fc: Linear<2048, 10>,
    }
    forward(x: [B, 1, 32, 32]) -> [B, 10];
}

/// The presets, by name, with their layer tables.
pub const PRESETS: crate::Presets = &[
    ("mlp", DigitsMlp::<64>::summary),
    ("cnn", DigitsCnn::summary),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_const_equals_built_count() {
        let dev = Cpu::default();
        let mlp = dev.build_module::<DigitsMlp<64>, f32>();
        assert_eq!(DigitsMlp::<64>::PARAMS, mlp.num_trainable_params());
        assert_eq!(DigitsMlp::<64>::PARAMS, 64 * 64 + 64 + 64 * 10 + 10);
    }

    #[test]
    fn runs_on_a_runtime_batch() {
        let dev = Cpu::default();
        let mut mlp = dev.build_module::<DigitsMlp<16>, f32>();
        let x: Tensor<(usize, Const<INPUTS>), f32, _> = dev.zeros_like(&(3, Const));
        assert_eq!(mlp.forward(x.clone()).shape(), &(3, Const::<CLASSES>));
        assert_eq!(mlp.forward_mut(x).shape(), &(3, Const::<CLASSES>));
    }

    #[test]
    fn cnn_sizes_come_from_the_dsl() {
        let dev = Cpu::default();
        let cnn = dev.build_module::<DigitsCnn, f32>();
        assert_eq!(DigitsCnn::PARAMS, cnn.num_trainable_params());
        let s = DigitsCnn::summary();
        let shapes: Vec<&str> = s.rows.iter().map(|r| r.output.as_str()).collect();
        assert_eq!(shapes[3], "[B, 16, 16, 16]");
        assert_eq!(shapes[7], "[B, 32, 8, 8]");
        assert_eq!(shapes[8], "[B, 2048]");
        let x: Tensor<(usize, Const<1>, Const<32>, Const<32>), f32, _> =
            dev.zeros_like(&(3, Const, Const, Const));
        assert_eq!(cnn.forward(x).shape(), &(3, Const::<CLASSES>));
    }

    #[test]
    fn summary_lists_the_layers() {
        let s = DigitsMlp::<64>::summary();
        let names: Vec<&str> = s.rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["fc1", "act", "drop", "fc2"]);
        assert_eq!(s.total_params, DigitsMlp::<64>::PARAMS);
    }
}
