//! Parity with Hugging Face's `CLIPModel` (llm.c `test_gpt2` style): the same weights and
//! batch as `tools/reference/arch_clip.py` (3 image-text pairs, `return_loss=True`), and the
//! embeddings, similarity logits, contrastive loss and every gradient side by side. CLIP has
//! no dropout or batch norm, so inference mode (`forward`) is what Hugging Face's `model.eval()`
//! computes, gradients included.

use neural_arch::checkpoint::tensor_names;
use neural_arch::parity::{check_abs, check_rel, grads_by_name, Reference};
use neural_arch::prelude::*;
use neural_arch_models::clip::{normalize, similarity_logits, ClipModel, ClipParity};
use std::collections::BTreeSet;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/clip")
}

fn as_f64(v: Vec<f32>) -> Vec<f64> {
    v.into_iter().map(f64::from).collect()
}

#[test]
fn clip_matches_hugging_face() {
    let dev = Cpu::default();
    let mut m = dev.build_module::<ClipParity, f32>();
    let loaded = m
        .load_safetensors(dir().join("weights.safetensors"))
        .unwrap();
    assert_eq!(loaded.loaded, 78);
    assert!(loaded.ignored.is_empty(), "{:?}", loaded.ignored);
    let r = Reference::open(dir().join("expected.safetensors")).unwrap();
    let ids: Tensor<Rank2<3, 8>, usize, _> =
        dev.tensor_from_vec(r.ids("input_ids").unwrap(), (Const, Const));
    let pixels: Tensor<Rank4<3, 3, 16, 16>, f32, _> = dev.tensor_from_vec(
        r.values("pixel_values")
            .unwrap()
            .iter()
            .map(|&v| v as f32)
            .collect(),
        (Const, Const, Const, Const),
    );

    let grads = m.alloc_grads();
    let (text, image) = m.forward((ids.traced(grads), pixels.leaky_traced()));
    let mut fails = Vec::new();
    let mut report = Vec::new();
    let mut check = |what: &str, got: Vec<f32>, key: &str| match check_abs(
        what,
        &as_f64(got),
        r.values(key).unwrap(),
        1e-4,
    ) {
        Ok(d) => report.push(format!("{what} max abs {:.2e}", d.max_abs)),
        Err(e) => fails.push(e),
    };
    check(
        "text_embeds",
        normalize(text.with_empty_tape()).unwrap().as_vec(),
        "text_embeds",
    );
    check(
        "image_embeds",
        normalize(image.with_empty_tape()).unwrap().as_vec(),
        "image_embeds",
    );
    let per_image = similarity_logits(
        image.with_empty_tape(),
        text.with_empty_tape(),
        &m.logit_scale,
    )
    .unwrap();
    check("logits_per_image", per_image.as_vec(), "logits_per_image");
    let per_text = similarity_logits(
        text.with_empty_tape(),
        image.with_empty_tape(),
        &m.logit_scale,
    )
    .unwrap();
    check("logits_per_text", per_text.as_vec(), "logits_per_text");
    let loss = clip_loss(image, text, &m.logit_scale).unwrap();
    check("loss", vec![loss.array()], "loss");

    let g = loss.backward();
    let ours = grads_by_name(&m, &g);
    let mut worst = (0.0f64, String::new());
    for (k, v) in &ours {
        let key = format!("grad.{k}");
        // A key bias adds `q·b` to every score of a query, which the softmax cancels: its
        // gradient is exactly zero, and both sides hold only round-off (~1e-9), which a
        // relative check would compare with itself. It is checked to be zero instead.
        let zero = k.ends_with("k_proj.bias");
        match r.values(&key).map_err(|e| e.to_string()).and_then(|want| {
            if zero {
                check_abs(&key, v, &vec![0.0; want.len()], 1e-7)?;
                check_abs(&key, want, &vec![0.0; want.len()], 1e-7)
            } else {
                check_rel(&key, v, want, 1e-3)
            }
        }) {
            Ok(_) if zero => {}
            Ok(d) if d.rel_to_max > worst.0 => worst = (d.rel_to_max, key),
            Ok(_) => {}
            Err(e) => fails.push(e),
        }
    }
    report.push(format!("worst gradient {} rel {:.2e}", worst.1, worst.0));
    let ours: BTreeSet<String> = ours.into_iter().map(|(k, _)| format!("grad.{k}")).collect();
    let theirs: BTreeSet<String> = r
        .keys()
        .filter(|k| k.starts_with("grad."))
        .map(str::to_string)
        .collect();
    assert_eq!(ours, theirs, "gradient names differ");
    eprintln!("clip: {}", report.join("; "));
    assert!(fails.is_empty(), "{}", fails.join("\n"));
}

/// The parity preset with one text layer and a projection of 8 instead of 16.
type Other = ClipModel<64, 8, 32, 4, 37, 1, 60, 16, 4, 4, 17, 32, 4, 37, 2, 8>;

#[test]
fn another_presets_file_is_refused_by_name() {
    let dev = Cpu::default();
    let mut m = dev.build_module::<Other, f32>();
    let before = m.text_projection.weight.as_vec();
    let e = m
        .load_safetensors(dir().join("weights.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`text_projection.weight` is [16, 32] in the file, but the model needs [8, 32]"),
        "{e}"
    );
    assert!(e.contains("16 in the file but not in the model"), "{e}");
    assert!(e.contains("`text_model.encoder.layers.1."), "{e}");
    assert_eq!(m.text_projection.weight.as_vec(), before, "nothing changes");
    assert_eq!(tensor_names(&m).len(), 78 - 16);
}
