//! BERT against Hugging Face transformers, llm.c `test_gpt2` style: the same weights and batch
//! (`tools/reference/arch_bert.py` writes them), then logits, loss and every gradient side by
//! side. The batch pads one sequence through the attention mask and ignores some labels (-100).

use crate::common::{safetensors_view, write_f32_file};
use neural_arch::checkpoint::tensor_names;
use neural_arch::parity::{check_abs, check_rel, grads_by_name, Reference};
use neural_arch::prelude::*;
use neural_arch_models::bert::{masked_lm_loss, BertParity, BertParityClassifier, BertTiny};
use std::collections::BTreeSet;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/bert")
}

type Ids = Tensor<(usize, usize), usize, Cpu>;
type Mask = Tensor<(usize, usize), bool, Cpu>;

/// `input_ids`, `attention_mask`, `token_type_ids` of the reference batch.
fn batch(dev: &Cpu, r: &Reference) -> (Ids, Mask, Ids) {
    let (shape, _) = r.get("input_ids").unwrap();
    let bt = (shape[0], shape[1]);
    let ids = dev.tensor_from_vec(r.ids("input_ids").unwrap(), bt);
    let mask: Vec<bool> = r
        .values("attention_mask")
        .unwrap()
        .iter()
        .map(|&m| m != 0.0)
        .collect();
    let mask = dev.tensor_from_vec(mask, bt);
    let types = dev.tensor_from_vec(r.ids("token_type_ids").unwrap(), bt);
    (ids, mask, types)
}

fn f64s(t: Vec<f32>) -> Vec<f64> {
    t.into_iter().map(f64::from).collect()
}

#[test]
fn masked_lm_matches_hugging_face() {
    let dev = Cpu::default();
    let r = Reference::open(dir().join("expected.safetensors")).unwrap();
    let mut model = dev.build_module::<BertParity, f32>();
    let report = model
        .load_safetensors(dir().join("weights.safetensors"))
        .unwrap();
    assert_eq!(report.loaded, tensor_names(&model).len());

    let (ids, mask, types) = batch(&dev, &r);
    let labels: Vec<i64> = r
        .values("labels")
        .unwrap()
        .iter()
        .map(|&l| l as i64)
        .collect();
    assert!(labels.contains(&-100));
    let grads = model.alloc_grads();
    let logits = model.forward((
        ids.traced(grads),
        mask,
        types.put_tape(OwnedTape::default()),
    ));
    let logits_v = f64s(logits.as_vec());
    let loss = masked_lm_loss(logits, &labels).unwrap();
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

/// The head's LayerNorm sees a variance ~1e-6 in the reference: PyTorch's default eps (1e-5)
/// instead of BERT's 1e-12 moves the logits far beyond the tolerance, so the parity above
/// checks the eps.
#[test]
fn the_default_eps_would_not_match() {
    let dev = Cpu::default();
    let r = Reference::open(dir().join("expected.safetensors")).unwrap();
    let mut model = dev.build_module::<BertParity, f32>();
    model
        .load_safetensors(dir().join("weights.safetensors"))
        .unwrap();
    assert_eq!(model.cls.predictions.transform.layer_norm.eps, 1e-12);
    model.cls.predictions.transform.layer_norm.eps = 1e-5;
    let (ids, mask, types) = batch(&dev, &r);
    let logits = f64s(model.forward((ids, mask, types)).as_vec());
    let d = neural_arch::parity::diff(&logits, r.values("logits").unwrap()).unwrap();
    assert!(d.max_abs > 1e-2, "eps 1e-5 is indistinguishable: {d:?}");
}

#[test]
fn sequence_classifier_matches_hugging_face() {
    let dev = Cpu::default();
    let r = Reference::open(dir().join("expected.safetensors")).unwrap();
    let want = Reference::open(dir().join("expected_cls.safetensors")).unwrap();
    let mut model = dev.build_module::<BertParityClassifier, f32>();
    model
        .load_safetensors(dir().join("weights_cls.safetensors"))
        .unwrap();
    let (ids, mask, types) = batch(&dev, &r);
    let logits = model.forward((ids, mask, types));
    let d = check_abs(
        "classifier logits",
        &f64s(logits.as_vec()),
        want.values("logits").unwrap(),
        1e-4,
    )
    .unwrap();
    eprintln!("classifier logits: max abs {:.3e}", d.max_abs);
}

#[test]
fn a_wrong_file_is_an_error_naming_the_tensors() {
    let dev = Cpu::default();
    // The classifier's file in the masked-LM model: the head is missing, the pooler and the
    // classifier are extra (the pooler is ignored, as HF does for BertForMaskedLM).
    let mut mlm = dev.build_module::<BertParity, f32>();
    let e = mlm
        .load_safetensors(dir().join("weights_cls.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("`cls.predictions.bias` [64]"), "{e}");
    assert!(e.contains("`classifier.weight` [3, 32]"), "{e}");
    assert!(!e.contains("bert.pooler"), "{e}");
    // Another preset: every shape that differs is named.
    let mut tiny = dev.build_module::<BertTiny, f32>();
    let e = tiny
        .load_safetensors(dir().join("weights.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`bert.embeddings.word_embeddings.weight` is [64, 32] in the file, but the model needs [8000, 128]"),
        "{e}"
    ); // The file with one tensor removed: the message names it, and the model is unchanged.
    let bytes = std::fs::read(dir().join("weights.safetensors")).unwrap();
    let gone = "bert.encoder.layer.1.output.LayerNorm.weight";
    let kept: Vec<_> = safetensors_view(&bytes)
        .into_iter()
        .filter(|(k, _)| k != gone)
        .collect();
    let path =
        std::env::temp_dir().join(format!("bert-one-less-{}.safetensors", std::process::id()));
    write_f32_file(&path, &kept);
    let before = mlm.cls.predictions.bias.bias.as_vec();
    let e = mlm.load_safetensors(&path).unwrap_err().to_string();
    std::fs::remove_file(&path).ok();
    assert!(e.contains("1 missing from the file"), "{e}");
    assert!(e.contains(&format!("`{gone}` [32]")), "{e}");
    assert_eq!(mlm.cls.predictions.bias.bias.as_vec(), before);
}
