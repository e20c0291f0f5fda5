//! GPT-2 against Hugging Face `GPT2LMHeadModel` (llm.c's `test_gpt2` idea): the same weights
//! and batch, then logits, loss and every gradient side by side. The reference is written by
//! `tools/reference/arch_gpt2.py`.

use neural_arch::parity::{check_abs, check_rel, grads_by_name, Reference};
use neural_arch::prelude::*;
use neural_arch::Built;
use neural_arch_models::gpt2::{Gpt2LMHeadModel, Gpt2Parity};
use std::collections::BTreeSet;

use crate::common::{safetensors_view, write_f32_file};
use std::path::PathBuf;

type Gpt2ParityModule = Built<Gpt2Parity, f32, Cpu>;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/gpt2")
}

fn as_f64(v: Vec<f32>) -> Vec<f64> {
    v.into_iter().map(f64::from).collect()
}

#[test]
fn logits_loss_and_gradients_match_hugging_face() {
    let dev = Cpu::default();
    let mut model = dev.build_module::<Gpt2Parity, f32>();
    let report = model
        .load_safetensors(dir().join("weights.safetensors"))
        .unwrap();
    assert_eq!(report.loaded, 28);
    let reference = Reference::open(dir().join("expected.safetensors")).unwrap();
    let (shape, _) = reference.get("input_ids").unwrap();
    let (b, t) = (shape[0], shape[1]);
    let ids = reference.ids("input_ids").unwrap();

    let grads = model.alloc_grads();
    let x = dev.tensor_from_vec(ids.clone(), (b, t));
    let logits = model.forward(x.traced(grads));
    let logits_values = as_f64(logits.as_vec());

    // HF's causal-LM loss: position i predicts token i + 1; the last position predicts nothing.
    let targets: Vec<usize> = (0..b * t)
        .map(|i| {
            if i % t == t - 1 {
                usize::MAX
            } else {
                ids[i + 1]
            }
        })
        .collect();
    let options = CrossEntropy {
        ignore_index: Some(usize::MAX),
        ..Default::default()
    };
    let loss = cross_entropy(logits, &targets, options).unwrap();
    let loss_value = f64::from(loss.array());
    let grads = loss.backward();

    let mut failures = Vec::new();
    let mut report = Vec::new();
    let want = reference.values("logits").unwrap();
    match check_abs("logits", &logits_values, want, 1e-4) {
        Ok(d) => report.push(format!("logits max abs {:.2e}", d.max_abs)),
        Err(e) => failures.push(e),
    }
    let want = reference.values("loss").unwrap();
    match check_abs("loss", &[loss_value], want, 1e-4) {
        Ok(d) => report.push(format!("loss abs {:.2e}", d.max_abs)),
        Err(e) => failures.push(e),
    }
    let ours = grads_by_name(&model, &grads);
    // HF's Conv1D weights (and so their gradients) are [in, out], ours [out, in]: compare in
    // HF's layout, through the same patterns the loader transposes by.
    let transposed = Gpt2ParityModule::load_options().transposed;
    let mut worst = (0.0, String::new());
    for (name, g) in &ours {
        let (shape, want) = match reference.get(&format!("grad.{name}")) {
            Ok(w) => w,
            Err(e) => {
                failures.push(e.to_string());
                continue;
            }
        };
        let g = if transposed.iter().any(|p| name.ends_with(&format!(".{p}"))) {
            let (r, c) = (shape[0], shape[1]);
            // Ours is [c, r]: element (i, j) of HF's [r, c] is ours (j, i).
            (0..r * c).map(|k| g[(k % c) * r + k / c]).collect()
        } else {
            g.clone()
        };
        match check_rel(&format!("grad {name}"), &g, want, 1e-3) {
            Ok(d) if d.rel_to_max > worst.0 => worst = (d.rel_to_max, name.clone()),
            Ok(_) => {}
            Err(e) => failures.push(e),
        }
    }
    report.push(format!("worst gradient rel {:.2e} ({})", worst.0, worst.1));
    eprintln!("gpt2 parity: {}", report.join(", "));

    let ours: BTreeSet<String> = ours.into_iter().map(|(n, _)| n).collect();
    let theirs: BTreeSet<String> = reference
        .keys()
        .filter_map(|k| k.strip_prefix("grad.").map(str::to_string))
        .collect();
    if ours != theirs {
        failures.push(format!(
            "gradient names differ: only ours {:?}, only the reference's {:?}",
            ours.difference(&theirs).collect::<Vec<_>>(),
            theirs.difference(&ours).collect::<Vec<_>>()
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_checkpoint_of_another_shape_is_refused_by_name() {
    let dev = Cpu::default();
    // Three blocks where the file has two, and a wider MLP.
    let mut deeper = dev.build_module::<Gpt2LMHeadModel<64, 16, 32, 3, 2, 128>, f32>();
    let e = deeper
        .load_safetensors(dir().join("weights.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("transformer.h.2.attn.c_attn.weight"), "{e}");
    let mut wider = dev.build_module::<Gpt2LMHeadModel<64, 16, 32, 2, 2, 256>, f32>();
    let e = wider
        .load_safetensors(dir().join("weights.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`transformer.h.0.mlp.c_fc.weight` is [32, 128] in the file, but the model needs [32, 256] (stored transposed"),
        "{e}"
    );
}

#[test]
fn a_gpt2model_file_with_mask_buffers_loads() {
    // What older Hub files hold: `GPT2Model` keys (no `transformer.`), the `attn.bias` and
    // `attn.masked_bias` buffers, and sometimes the tied `lm_head.weight`.
    let bytes = std::fs::read(dir().join("weights.safetensors")).unwrap();
    let st = safetensors_view(&bytes);
    let mask = vec![0u8; 4 * 16 * 16];
    let scalar = vec![0u8; 4];
    let mut views: Vec<(String, crate::common::Raw)> = st
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("transformer.").unwrap_or(&k).to_string(), v))
        .collect();
    for i in 0..2 {
        views.push((
            format!("h.{i}.attn.bias"),
            (vec![1, 1, 16, 16], mask.clone()),
        ));
        views.push((format!("h.{i}.attn.masked_bias"), (vec![], scalar.clone())));
    }
    let path = std::env::temp_dir().join(format!("gpt2-base-{}.safetensors", std::process::id()));
    write_f32_file(&path, &views);
    let dev = Cpu::default();
    let mut model = dev.build_module::<Gpt2Parity, f32>();
    let report = model.load_safetensors(&path).unwrap();
    assert_eq!((report.loaded, report.ignored.len()), (28, 4));
    let mut from_lm = dev.build_module::<Gpt2Parity, f32>();
    from_lm
        .load_safetensors(dir().join("weights.safetensors"))
        .unwrap();
    let ids = dev.tensor([[1usize, 2, 3]]);
    assert_eq!(
        model.forward(ids.clone()).as_vec(),
        from_lm.forward(ids).as_vec()
    );
    std::fs::remove_file(path).ok();
}
