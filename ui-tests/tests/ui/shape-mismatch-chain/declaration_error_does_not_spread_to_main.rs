use neural_arch::prelude::*;

model! {
    pub struct Mlp {
        fc1: Linear<784, 128>,
        fc2: Linear<256, 10>,
    }
    forward(x: [B, 784]) -> [B, 10];
}

fn main() {
    let dev = Cpu::default();
    let m = dev.build_module::<Mlp, f32>();
    let x: Tensor<Rank2<2, 784>, f32, _> = dev.zeros();
    let y = m.forward(x);
    println!("{:?} {}", y.shape(), Mlp::PARAMS);
}
