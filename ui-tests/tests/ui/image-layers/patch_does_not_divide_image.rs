use neural_arch::prelude::*;

model! {
    pub struct Vit {
        patches: PatchEmbed<3, 64, 16>,
    }
    forward(x: [B, 3, 200, 224]) -> [B, 182, 64];
}

fn main() {}
