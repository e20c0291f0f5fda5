//! Llama against Hugging Face `LlamaForCausalLM` (llm.c's `test_gpt2` idea): the same weights
//! and batch, then logits, loss and every gradient side by side. The reference is written by
//! `tools/reference/arch_llama.py` (with `rms_norm_eps = 1e-5`).

use neural_arch::parity::{check_abs, check_rel, grads_by_name, Reference};
use neural_arch::prelude::*;
use neural_arch_models::llama::{LlamaForCausalLM, LlamaParity, LLAMA2_RMS_NORM_EPS};
use std::collections::BTreeSet;

use crate::common::{safetensors_view, write_f32_file};
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/llama")
}

#[test]
fn logits_loss_and_gradients_match_hugging_face() {
    let dev = Cpu::default();
    let mut model = dev.build_module::<LlamaParity, f32>();
    let report = model
        .load_safetensors(dir().join("weights.safetensors"))
        .unwrap();
    assert_eq!(report.loaded, 21);
    model.set_rms_norm_eps(LLAMA2_RMS_NORM_EPS);
    let reference = Reference::open(dir().join("expected.safetensors")).unwrap();
    let (shape, _) = reference.get("input_ids").unwrap();
    let (b, t) = (shape[0], shape[1]);
    let ids = reference.ids("input_ids").unwrap();

    let grads = model.alloc_grads();
    let x = dev.tensor_from_vec(ids.clone(), (b, t));
    let logits = model.forward(x.traced(grads));
    let logits_values: Vec<f64> = logits.as_vec().into_iter().map(f64::from).collect();

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
    match check_abs(
        "logits",
        &logits_values,
        reference.values("logits").unwrap(),
        1e-4,
    ) {
        Ok(d) => report.push(format!("logits max abs {:.2e}", d.max_abs)),
        Err(e) => failures.push(e),
    }
    match check_abs(
        "loss",
        &[loss_value],
        reference.values("loss").unwrap(),
        1e-4,
    ) {
        Ok(d) => report.push(format!("loss abs {:.2e}", d.max_abs)),
        Err(e) => failures.push(e),
    }
    let ours = grads_by_name(&model, &grads);
    let mut worst = (0.0, String::new());
    for (name, g) in &ours {
        let want = match reference.values(&format!("grad.{name}")) {
            Ok(w) => w,
            Err(e) => {
                failures.push(e.to_string());
                continue;
            }
        };
        match check_rel(&format!("grad {name}"), g, want, 1e-3) {
            Ok(d) if d.rel_to_max > worst.0 => worst = (d.rel_to_max, name.clone()),
            Ok(_) => {}
            Err(e) => failures.push(e),
        }
    }
    report.push(format!("worst gradient rel {:.2e} ({})", worst.0, worst.1));
    eprintln!("llama parity: {}", report.join(", "));

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
fn the_default_eps_is_not_the_checkpoints() {
    // The reference was made with rms_norm_eps = 1e-5; the layer default 1e-6 must show in the
    // logits (the embeddings are small, so eps is not negligible): the test above would catch
    // a model that ignored the setting.
    let dev = Cpu::default();
    let mut model = dev.build_module::<LlamaParity, f32>();
    model
        .load_safetensors(dir().join("weights.safetensors"))
        .unwrap();
    let reference = Reference::open(dir().join("expected.safetensors")).unwrap();
    let ids = reference.ids("input_ids").unwrap();
    let n = ids.len();
    let logits: Vec<f64> = model
        .forward(dev.tensor_from_vec(ids, (2, n / 2)))
        .as_vec()
        .into_iter()
        .map(f64::from)
        .collect();
    assert!(check_abs("logits", &logits, reference.values("logits").unwrap(), 1e-4).is_err());
}

#[test]
fn a_checkpoint_of_another_shape_is_refused_by_name() {
    let dev = Cpu::default();
    // 4 key/value heads where the file has 2.
    let mut mha = dev.build_module::<LlamaForCausalLM<64, 32, 2, 4, 4, 8, 64, 10000>, f32>();
    let e = mha
        .load_safetensors(dir().join("weights.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`model.layers.0.self_attn.k_proj.weight` is [16, 32] in the file, but the model needs [32, 32]"),
        "{e}"
    );
    // A file without its head.
    let bytes = std::fs::read(dir().join("weights.safetensors")).unwrap();
    let tensors: Vec<_> = safetensors_view(&bytes)
        .into_iter()
        .filter(|(k, _)| k != "lm_head.weight")
        .collect();
    let path =
        std::env::temp_dir().join(format!("llama-headless-{}.safetensors", std::process::id()));
    write_f32_file(&path, &tensors);
    let mut model = dev.build_module::<LlamaParity, f32>();
    let e = model.load_safetensors(&path).unwrap_err().to_string();
    assert!(
        e.contains("`lm_head.weight` [64, 32]") && e.contains("missing"),
        "{e}"
    );
    std::fs::remove_file(path).ok();
}
