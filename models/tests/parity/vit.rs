//! The Vision Transformer against Hugging Face transformers, llm.c `test_gpt2` style: the same
//! weights and images (`tools/reference/arch_vit.py` writes them), then logits, loss and every
//! gradient side by side.

use crate::common::{safetensors_view, write_f32_file};
use neural_arch::checkpoint::tensor_names;
use neural_arch::parity::{check_abs, check_rel, grads_by_name, Reference};
use neural_arch::prelude::*;
use neural_arch_models::vit::{VitParity, VitTiny};
use std::collections::BTreeSet;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/vit")
}

#[test]
fn image_classifier_matches_hugging_face() {
    let dev = Cpu::default();
    let r = Reference::open(dir().join("expected.safetensors")).unwrap();
    let mut model = dev.build_module::<VitParity, f32>();
    let report = model
        .load_safetensors(dir().join("weights.safetensors"))
        .unwrap();
    assert_eq!(report.loaded, tensor_names(&model).len());

    let (shape, pixels) = r.get("pixel_values").unwrap();
    assert_eq!(shape, [2, 3, 16, 16]);
    let pixels: Vec<f32> = pixels.iter().map(|&v| v as f32).collect();
    let x: Tensor<(usize, Const<3>, Const<16>, Const<16>), f32, _> =
        dev.tensor_from_vec(pixels, (2, Const, Const, Const));
    let labels = r.ids("labels").unwrap();

    let grads = model.alloc_grads();
    let logits = model.forward(x.traced(grads));
    let logits_v: Vec<f64> = logits.as_vec().into_iter().map(f64::from).collect();
    let loss = cross_entropy(logits, &labels, CrossEntropy::default()).unwrap();
    let loss_v = loss.array() as f64;
    let grads = loss.backward();

    let mut failures = Vec::new();
    let mut worst = (String::new(), 0.0f64);
    match check_abs("logits", &logits_v, r.values("logits").unwrap(), 1e-4) {
        Ok(d) => eprintln!("logits: max abs {:.3e}", d.max_abs),
        Err(e) => failures.push(e),
    }
    match check_abs("loss", &[loss_v], r.values("loss").unwrap(), 1e-4) {
        Ok(d) => eprintln!("loss: ours {loss_v:.6}, max abs {:.3e}", d.max_abs),
        Err(e) => failures.push(e),
    }
    let ours = grads_by_name(&model, &grads);
    let names: BTreeSet<String> = ours.iter().map(|(k, _)| format!("grad.{k}")).collect();
    let want: BTreeSet<String> = r
        .keys()
        .filter(|k| k.starts_with("grad."))
        .map(str::to_string)
        .collect();
    assert_eq!(names, want, "gradient names differ from the reference's");
    for (k, g) in &ours {
        let want = r.values(&format!("grad.{k}")).unwrap();
        // The key bias adds the same `q·b_k` to every score of a query, which the softmax
        // removes: its gradient is zero in exact arithmetic, and both sides hold rounding noise
        // (~1e-8), meaningless relative to itself. It is checked against the reference's
        // zero in absolute terms instead.
        let checked = if k.ends_with(".key.bias") {
            check_abs(&format!("grad.{k}"), g, want, 1e-6).map(|mut d| {
                eprintln!(
                    "grad.{k} (zero in exact arithmetic): max abs {:.3e}",
                    d.max_abs
                );
                d.rel_to_max = 0.0;
                d
            })
        } else {
            check_rel(&format!("grad.{k}"), g, want, 1e-3)
        };
        match checked {
            Ok(d) if d.rel_to_max > worst.1 => worst = (k.clone(), d.rel_to_max),
            Ok(_) => {}
            Err(e) => failures.push(e),
        }
    }
    eprintln!("worst gradient: {} (relative {:.3e})", worst.0, worst.1);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The first LayerNorm sees a variance ~1e-6 in the reference: PyTorch's default eps (1e-5)
/// instead of ViT's 1e-12 moves the logits far beyond the tolerance, so the parity above checks
/// the eps.
#[test]
fn the_default_eps_would_not_match() {
    let dev = Cpu::default();
    let r = Reference::open(dir().join("expected.safetensors")).unwrap();
    let mut model = dev.build_module::<VitParity, f32>();
    model
        .load_safetensors(dir().join("weights.safetensors"))
        .unwrap();
    let first = &mut model.vit.encoder.layer.modules[0].layernorm_before;
    assert_eq!(first.eps, 1e-12);
    first.eps = 1e-5;
    let pixels: Vec<f32> = r
        .values("pixel_values")
        .unwrap()
        .iter()
        .map(|&v| v as f32)
        .collect();
    let x: Tensor<(usize, Const<3>, Const<16>, Const<16>), f32, _> =
        dev.tensor_from_vec(pixels, (2, Const, Const, Const));
    let logits: Vec<f64> = model
        .forward(x)
        .as_vec()
        .into_iter()
        .map(f64::from)
        .collect();
    let d = neural_arch::parity::diff(&logits, r.values("logits").unwrap()).unwrap();
    assert!(d.max_abs > 1e-2, "eps 1e-5 is indistinguishable: {d:?}");
}

#[test]
fn another_presets_file_is_an_error_naming_the_tensors() {
    let dev = Cpu::default();
    let mut tiny = dev.build_module::<VitTiny, f32>();
    let before = tiny.classifier.weight.as_vec();
    let e = tiny
        .load_safetensors(dir().join("weights.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(
            "`vit.embeddings.position_embeddings` is [1, 17, 32] in the file, but the model \
             needs [1, 65, 128]"
        ),
        "{e}"
    );
    // VitTiny has 4 layers, the file 2: layers 2 and 3 are missing.
    assert!(
        e.contains("`vit.encoder.layer.2.attention.attention.query.weight` [128, 128]"),
        "{e}"
    );
    assert_eq!(
        tiny.classifier.weight.as_vec(),
        before,
        "the model is unchanged"
    );
}

#[test]
fn a_file_without_one_tensor_is_an_error_naming_it() {
    let dev = Cpu::default();
    let bytes = std::fs::read(dir().join("weights.safetensors")).unwrap();
    let gone = "vit.embeddings.cls_token";
    let kept: Vec<_> = safetensors_view(&bytes)
        .into_iter()
        .filter(|(k, _)| k != gone)
        .collect();
    let path =
        std::env::temp_dir().join(format!("vit-one-less-{}.safetensors", std::process::id()));
    write_f32_file(&path, &kept);
    let mut model = dev.build_module::<VitParity, f32>();
    let e = model.load_safetensors(&path).unwrap_err().to_string();
    std::fs::remove_file(&path).ok();
    assert!(e.contains("1 missing from the file"), "{e}");
    assert!(e.contains("`vit.embeddings.cls_token` [1, 1, 32]"), "{e}");
}
