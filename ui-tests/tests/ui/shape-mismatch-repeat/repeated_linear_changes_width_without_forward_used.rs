use neural_arch::prelude::*;

model! {
    pub struct Deep {
        blocks: [Linear<64, 128>; 2],
    }
}

fn main() {
    let dev = Cpu::default();
    let m = dev.build_module::<Deep, f32>();
    let x: Tensor<Rank2<2, 64>, f32, _> = dev.zeros();
    let _ = m.forward(x);
}
