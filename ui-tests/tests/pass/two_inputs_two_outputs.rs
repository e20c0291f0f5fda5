use neural_arch::prelude::*;

model! {
    /// Two towers with a shared projection.
    pub struct TwoTower {
        img: Linear<4, 3>,
        txt: Linear<5, 3>,
        shared: Linear<3, 3>,
    }
    forward(a: [B, 4], b: [B, 5]) -> ([B, 3], [B, 3]) {
        let ea = shared(img(a));
        let eb = shared(txt(b));
        let both = ea * eb;
        (ea + both, eb - both)
    }
}

pub fn check() {
    let dev = Cpu::default();
    let tt = dev.build_module::<TwoTower, f32>();
    let a: Tensor<(usize, Const<4>), f32, _> = dev.zeros_like(&(6, Const));
    let b: Tensor<(usize, Const<5>), f32, _> = dev.zeros_like(&(6, Const));
    let (ya, yb) = tt.forward((a, b));
    assert_eq!(ya.shape().0, 6);
    assert_eq!(yb.shape().0, 6);
}
