//! Parity with torchvision's ResNet (llm.c `test_gpt2` style): the same weights and batch as
//! `tools/reference/arch_resnet.py`, and the logits, loss, gradients and updated running
//! statistics side by side.
//!
//! Batch norm's two modes are compared separately:
//! - `logits`: evaluation mode, `model.forward` here, `model.eval()` there (running statistics);
//! - `logits_train`, `loss`, `grad.*`, `running.*`: training mode, `model.forward_mut` here,
//!   `model.train()` there (batch statistics, running statistics updated), as a training step
//!   runs.

use neural_arch::checkpoint::tensor_names;
use neural_arch::parity::{check_abs, check_rel, grads_by_name, Reference};
use neural_arch::prelude::*;
use neural_arch_models::resnet::{ResNetParity, ResNetParityBottleneck};
use std::collections::BTreeSet;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/resnet")
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn as_f64(v: Vec<f32>) -> Vec<f64> {
    v.into_iter().map(f64::from).collect()
}

macro_rules! parity {
    ($preset:ty, $name:literal) => {{
        let dev = Cpu::default();
        let mut m = dev.build_module::<$preset, f32>();
        let report = m
            .load_safetensors(dir().join(concat!($name, "_weights.safetensors")))
            .unwrap();
        assert!(
            !report.ignored.is_empty()
                && report
                    .ignored
                    .iter()
                    .all(|k| k.ends_with("num_batches_tracked")),
            "{:?}",
            report.ignored
        );
        let r = Reference::open(dir().join(concat!($name, "_expected.safetensors"))).unwrap();
        let x: Tensor<Rank4<4, 3, 24, 24>, f32, _> =
            dev.tensor_from_vec(f32s(r.values("x").unwrap()), (Const, Const, Const, Const));
        let labels = r.ids("labels").unwrap();
        let mut fails = Vec::new();
        let mut report = Vec::new();

        // Evaluation mode.
        let logits = m.forward(x.clone());
        match check_abs(
            "logits (eval)",
            &as_f64(logits.as_vec()),
            r.values("logits").unwrap(),
            1e-4,
        ) {
            Ok(d) => report.push(format!("logits (eval) max abs {:.2e}", d.max_abs)),
            Err(e) => fails.push(e),
        }

        // Training mode.
        let grads = m.alloc_grads();
        let logits = m.forward_mut(x.traced(grads));
        match check_abs(
            "logits (train)",
            &as_f64(logits.as_vec()),
            r.values("logits_train").unwrap(),
            1e-4,
        ) {
            Ok(d) => report.push(format!("logits (train) max abs {:.2e}", d.max_abs)),
            Err(e) => fails.push(e),
        }
        let loss = cross_entropy(logits, &labels, CrossEntropy::default()).unwrap();
        match check_abs(
            "loss",
            &[f64::from(loss.array())],
            r.values("loss").unwrap(),
            1e-4,
        ) {
            Ok(d) => report.push(format!("loss max abs {:.2e}", d.max_abs)),
            Err(e) => fails.push(e),
        }
        let g = loss.backward();
        let ours = grads_by_name(&m, &g);
        let mut worst = (0.0f64, String::new());
        for (k, v) in &ours {
            let key = format!("grad.{k}");
            match r
                .values(&key)
                .map_err(|e| e.to_string())
                .and_then(|want| check_rel(&key, v, want, 1e-3))
            {
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

        // The running statistics after the training forward.
        let saved = std::env::temp_dir().join(format!(
            "resnet-parity-{}-{}.safetensors",
            $name,
            std::process::id()
        ));
        m.save_safetensors(&saved).unwrap();
        let after = Reference::open(&saved).unwrap();
        std::fs::remove_file(&saved).ok();
        let mut n_running = 0;
        for key in r.keys().filter(|k| k.starts_with("running.")) {
            let name = &key["running.".len()..];
            n_running += 1;
            if let Err(e) = check_abs(
                key,
                after.values(name).unwrap(),
                r.values(key).unwrap(),
                1e-5,
            ) {
                fails.push(e);
            }
        }
        assert!(n_running > 0);
        eprintln!("{}: {}", $name, report.join("; "));
        assert!(fails.is_empty(), "{}", fails.join("\n"));
    }};
}

#[test]
fn resnet_basic_matches_torchvision() {
    parity!(ResNetParity, "basic");
}

#[test]
fn resnet_bottleneck_matches_torchvision() {
    parity!(ResNetParityBottleneck, "bottleneck");
}

#[test]
fn a_wrong_file_is_refused_by_name() {
    let dev = Cpu::default();
    let mut m = dev.build_module::<ResNetParityBottleneck, f32>();
    let before = tensor_names(&m);
    let e = m
        .load_safetensors(dir().join("basic_weights.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not fit this model"), "{e}");
    assert!(e.contains("`layer1.0.conv3.weight`"), "{e}");
    assert!(
        e.contains("`layer1.0.conv1.weight` is [4, 4, 3, 3] in the file"),
        "{e}"
    );
    assert_eq!(before, tensor_names(&m));
}
