//! Where the Vision Transformer looks: attention rollout over the layers of [`VitTiny`], drawn
//! over test images (`attention.png` of a `train-vit` run).
//!
//! Attention rollout (Abnar and Zuidema, "Quantifying Attention Flow in Transformers",
//! <https://arxiv.org/abs/2005.00928>): each layer's attention probabilities, averaged over
//! the heads, are mixed half and half with the identity (the residual path) and multiplied
//! through the layers; the class token's row of the product says how much each patch
//! contributed to the token the classifier reads. The probabilities are recomputed from the
//! layers' own query and key projections, exactly as the forward pass computes them.

use crate::images::{Images, CLASS_NAMES, INPUT, SIDE};
use anyhow::Result;
use neural_arch::plot::{write_tiles, Tile};
use neural_arch::prelude::*;
use neural_arch_models::vit::VitTiny;
use std::path::Path;

/// ViT tiny as built on the CPU.
pub type Vit = Built<VitTiny, f32, Cpu>;
/// Patches per side of [`VitTiny`]'s 32×32 input (4×4 patches).
pub const GRID: usize = 8;
const TOKENS: usize = GRID * GRID + 1;
const WIDTH: usize = 128;
const HEADS: usize = 4;

type Pixels = Tensor<(usize, Const<3>, Const<INPUT>, Const<INPUT>), f32, Cpu>;

/// Head-averaged attention probabilities `[B][N·N]` from queries and keys `[B, N, D]`.
fn probabilities(q: &[f32], k: &[f32], batch: usize) -> Vec<Vec<f32>> {
    let hd = WIDTH / HEADS;
    let scale = 1.0 / (hd as f32).sqrt();
    (0..batch)
        .map(|b| {
            fn at(t: &[f32], b: usize, i: usize, h: usize, hd: usize) -> &[f32] {
                let o = (b * TOKENS + i) * WIDTH + h * hd;
                &t[o..o + hd]
            }
            let mut mean = vec![0.0f32; TOKENS * TOKENS];
            for h in 0..HEADS {
                for i in 0..TOKENS {
                    let qi = at(q, b, i, h, hd);
                    let scores: Vec<f32> = (0..TOKENS)
                        .map(|j| {
                            qi.iter()
                                .zip(at(k, b, j, h, hd))
                                .map(|(a, b)| a * b)
                                .sum::<f32>()
                                * scale
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let exp: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f32 = exp.iter().sum();
                    for j in 0..TOKENS {
                        mean[i * TOKENS + j] += exp[j] / sum / HEADS as f32;
                    }
                }
            }
            mean
        })
        .collect()
}

/// For each image, the rollout weight of each of the 8×8 patches (row-major), scaled so the
/// largest is 1.
pub fn rollout(model: &Vit, x: Pixels) -> Result<Vec<Vec<f32>>, ModelError> {
    let batch = x.shape().0;
    let mut h = model.vit.embeddings.try_forward(x)?;
    let mut flow: Vec<Vec<f32>> = (0..batch)
        .map(|_| {
            (0..TOKENS * TOKENS)
                .map(|p| if p / TOKENS == p % TOKENS { 1.0 } else { 0.0 })
                .collect()
        })
        .collect();
    for layer in model.vit.encoder.layer.modules.iter() {
        let normed = layer.layernorm_before.try_forward(h.clone())?;
        let attn = &layer.attention.attention;
        let q = attn.query.try_forward(normed.clone())?.as_vec();
        let k = attn.key.try_forward(normed)?.as_vec();
        for (f, a) in flow.iter_mut().zip(probabilities(&q, &k, batch)) {
            // (A + I)/2 times the flow so far.
            let mut next = vec![0.0f32; TOKENS * TOKENS];
            for i in 0..TOKENS {
                for m in 0..TOKENS {
                    let mix = 0.5 * a[i * TOKENS + m] + if i == m { 0.5 } else { 0.0 };
                    if mix == 0.0 {
                        continue;
                    }
                    for j in 0..TOKENS {
                        next[i * TOKENS + j] += mix * f[m * TOKENS + j];
                    }
                }
            }
            *f = next;
        }
        h = layer.try_forward(h)?;
    }
    Ok(flow
        .iter()
        .map(|f| {
            let cls = &f[1..TOKENS];
            let max = cls.iter().copied().fold(f32::MIN_POSITIVE, f32::max);
            cls.iter().map(|v| v / max).collect()
        })
        .collect())
}

/// Writes `path`: for each of the first `n` test images, the image and the rollout over it
/// (red: attended), captioned with the prediction and the truth.
pub fn write_attention_png(model: &Vit, test: &Images, n: usize, path: &Path) -> Result<()> {
    let n = n.min(test.len());
    let centre = (INPUT - SIDE) / 2;
    let mut x = Vec::with_capacity(n * 3 * INPUT * INPUT);
    for i in 0..n {
        crate::images::preprocess_into(test.image(i), centre, centre, false, &mut x);
    }
    let dev = Cpu::default();
    let pixels: Pixels = dev.try_tensor_from_vec(x, (n, Const, Const, Const))?;
    let logits = model.try_forward(pixels.clone())?.as_vec();
    let maps = rollout(model, pixels)?;
    let mut tiles = Vec::with_capacity(2 * n);
    for (i, map) in maps.iter().enumerate() {
        let img = test.image(i);
        let row = &logits[i * 10..(i + 1) * 10];
        let pred = (0..10).fold(0, |b, c| if row[c] > row[b] { c } else { b });
        let grey: Vec<[u8; 3]> = (0..INPUT * INPUT)
            .map(|p| {
                let (r, c) = (p / INPUT, p % INPUT);
                let inside =
                    (centre..centre + SIDE).contains(&r) && (centre..centre + SIDE).contains(&c);
                let v = if inside {
                    img[(r - centre) * SIDE + c - centre]
                } else {
                    0
                };
                [v, v, v]
            })
            .collect();
        let heat: Vec<[u8; 3]> = grey
            .iter()
            .enumerate()
            .map(|(p, g)| {
                let patch = (p / INPUT / 4) * GRID + (p % INPUT) / 4;
                let w = map[patch].clamp(0.0, 1.0);
                let v = g[0] as f32 * 0.5;
                [
                    (v + 255.0 * w * 0.8).min(255.0) as u8,
                    v as u8,
                    (v * (1.0 - w)) as u8,
                ]
            })
            .collect();
        tiles.push(Tile {
            side: INPUT,
            rgb: grey,
            caption: format!("true: {}", CLASS_NAMES[test.labels[i] as usize]),
        });
        tiles.push(Tile {
            side: INPUT,
            rgb: heat,
            caption: format!("pred: {}", CLASS_NAMES[pred]),
        });
    }
    write_tiles(
        &tiles,
        8,
        5,
        "ViT attention rollout (red: the patches the class token draws on)",
        path,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probabilities_are_head_averaged_softmax_rows() {
        let (q, k): (Vec<f32>, Vec<f32>) = (0..TOKENS * WIDTH)
            .map(|i| (((i * 7) % 13) as f32 * 0.05, ((i * 5) % 11) as f32 * 0.05))
            .unzip();
        let p = probabilities(&q, &k, 1);
        for i in 0..TOKENS {
            let sum: f32 = p[0][i * TOKENS..(i + 1) * TOKENS].iter().sum();
            assert!((sum - 1.0).abs() < 1e-5);
        }
        // Equal keys: uniform attention.
        let p = probabilities(&q, &vec![0.3; TOKENS * WIDTH], 1);
        assert!(p[0].iter().all(|v| (v - 1.0 / TOKENS as f32).abs() < 1e-6));
    }

    #[test]
    fn rollout_weights_every_patch_and_draws() -> Result<()> {
        let dev = Cpu::seed_from_u64(0);
        let model = dev.build_module::<VitTiny, f32>();
        let test = Images {
            pixels: (0..2 * SIDE * SIDE).map(|i| (i % 251) as u8).collect(),
            labels: vec![3, 7],
        };
        let path = std::env::temp_dir().join(format!("na-attn-{}.png", std::process::id()));
        write_attention_png(&model, &test, 2, &path)?;
        assert!(std::fs::metadata(&path)?.len() > 1000);
        std::fs::remove_file(path).ok();
        let x: Pixels = dev.sample_normal_like(&(1, Const, Const, Const));
        let maps = rollout(&model, x.clone())?;
        assert_eq!(maps[0].len(), GRID * GRID);
        assert!(maps[0].iter().all(|v| *v > 0.0 && *v <= 1.0 + 1e-6));

        // The recomputed probabilities are the layer's: P·V per head is its attention output.
        let layer = &model.vit.encoder.layer.modules[0];
        let normed = layer
            .layernorm_before
            .forward(model.vit.embeddings.forward(x));
        let attn = &layer.attention.attention;
        let (q, k, v) = (
            attn.query.forward(normed.clone()).as_vec(),
            attn.key.forward(normed.clone()).as_vec(),
            attn.value.forward(normed.clone()).as_vec(),
        );
        let want = attn.forward(normed).as_vec();
        let hd = WIDTH / HEADS;
        let mut worst = 0.0f32;
        for h in 0..HEADS {
            // One head alone: its own probabilities (the average over one head).
            let mask = |t: &[f32]| -> Vec<f32> {
                t.iter()
                    .enumerate()
                    .map(|(i, x)| if (i % WIDTH) / hd == h { *x } else { 0.0 })
                    .collect()
            };
            let p = probabilities(&mask(&q), &mask(&k), 1);
            for i in 0..TOKENS {
                for d in h * hd..(h + 1) * hd {
                    // Averaging over HEADS heads of which HEADS - 1 are uniform: undo it.
                    let uniform = (HEADS - 1) as f32 / HEADS as f32 / TOKENS as f32;
                    let got: f32 = (0..TOKENS)
                        .map(|j| (p[0][i * TOKENS + j] - uniform) * HEADS as f32 * v[j * WIDTH + d])
                        .sum();
                    worst = worst.max((got - want[i * WIDTH + d]).abs());
                }
            }
        }
        assert!(worst < 1e-4, "{worst}");
        Ok(())
    }
}
