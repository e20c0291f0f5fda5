//! The language-model trainers end to end: a few steps on the embedded Shakespeare, the
//! summary and checkpoint they leave, an exact resume, and clear errors for bad input.

mod common;

use common::{json, metrics};
use std::path::PathBuf;

fn temp(name: &str) -> PathBuf {
    common::tmp(&format!("lm-{name}"))
}

/// Runs a trainer binary with small settings and `extra` flags; (success, stdout, stderr).
fn train(bin: &str, extra: &[&str]) -> (bool, String, String) {
    let mut args = vec![
        "--corpus",
        "embedded",
        "--batch-size",
        "2",
        "--context",
        "16",
        "--eval-tokens",
        "256",
        "--sample-tokens",
        "4",
        "--eval-every",
        "4",
    ];
    args.extend_from_slice(extra);
    common::run(bin, None, &args)
}

const GPT2: &str = env!("CARGO_BIN_EXE_train-gpt2");
const LLAMA: &str = env!("CARGO_BIN_EXE_train-llama");

#[test]
fn a_short_run_learns_and_leaves_a_summary_and_a_checkpoint() {
    for (bin, name) in [(GPT2, "gpt2"), (LLAMA, "llama")] {
        let dir = temp(name);
        let (ok, out, err) = train(bin, &["--steps", "12", "--out", dir.to_str().unwrap()]);
        assert!(ok, "{name}: {err}");
        assert!(out.contains("sample"), "{name} prints samples: {out}");
        assert!(
            out.contains(&format!("tokens/s, summary in {}", dir.display())),
            "{name} ends with where the run is: {out}"
        );
        let s = json(&dir.join("summary.json"));
        for k in [
            "model",
            "preset",
            "params",
            "steps",
            "train_loss",
            "eval_loss",
            "tokens_per_sec",
            "peak_rss_bytes",
            "device",
            "dtype",
            "wall_seconds",
        ] {
            assert!(s.get(k).is_some(), "{name}: summary.json lacks {k}: {s}");
        }
        assert_eq!(s["steps"], 12);
        for f in ["model.safetensors", "optimizer.safetensors", "state.json"] {
            assert!(
                dir.join("checkpoint").join(f).exists(),
                "{name}: no checkpoint/{f}"
            );
        }
        assert!(dir.join("curves.png").exists() && dir.join("tokenizer.json").exists());
        let m = metrics(&dir);
        let losses: Vec<f64> = m.iter().filter_map(|v| v["loss"].as_f64()).collect();
        let first = losses[0];
        let last = losses[losses.len() - 3..].iter().sum::<f64>() / 3.0;
        assert!(
            last < first - 0.2,
            "{name}: the loss went from {first} to {last}"
        );
        std::fs::remove_dir_all(dir).ok();
    }
}

#[test]
fn a_stopped_run_resumes_to_the_same_metrics() {
    let (a, b) = (temp("whole"), temp("parts"));
    let (ok, _, err) = train(GPT2, &["--steps", "8", "--out", a.to_str().unwrap()]);
    assert!(ok, "{err}");
    let (ok, _, err) = train(
        GPT2,
        &[
            "--steps",
            "8",
            "--stop-after",
            "5",
            "--out",
            b.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(json(&b.join("summary.json"))["interrupted"], true);
    // Only --resume: the corpus, context and evaluation size come from the checkpoint (the
    // flags' defaults differ from this run's).
    let (ok, _, err) = common::run(GPT2, None, &["--resume", b.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(metrics(&a), metrics(&b));
    assert_eq!(
        json(&a.join("summary.json"))["eval_loss"],
        json(&b.join("summary.json"))["eval_loss"]
    );

    // A damaged checkpoint is refused with its name, not a panic.
    let model = b.join("checkpoint/model.safetensors");
    let bytes = std::fs::read(&model).expect("checkpoint");
    std::fs::write(&model, &bytes[..bytes.len() / 2]).expect("truncate");
    let (ok, _, err) = train(GPT2, &["--resume", b.to_str().unwrap(), "--steps", "9"]);
    assert!(!ok);
    assert!(err.contains("model.safetensors"), "{err}");
    // So is a checkpoint of another model.
    let (ok, _, err) = train(LLAMA, &["--resume", a.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("checkpoint of gpt2"), "{err}");
    for d in [a, b] {
        std::fs::remove_dir_all(d).ok();
    }
}

#[test]
fn eval_only_scores_a_token_file_and_rejects_bad_ids() {
    let dir = temp("tokens");
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.json");
    std::fs::write(
        &good,
        "[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]",
    )
    .unwrap();
    let out = dir.join("out");
    let (ok, _, err) = train(
        GPT2,
        &[
            "--eval-only",
            "--tokens",
            good.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    let loss = json(&out.join("summary.json"))["eval_loss"]
        .as_f64()
        .expect("eval_loss");
    assert!(loss > 1.0 && loss.is_finite(), "{loss}");

    let bad = dir.join("bad.json");
    std::fs::write(&bad, "[1, 2, 8000, 3]").unwrap();
    let (ok, _, err) = train(GPT2, &["--eval-only", "--tokens", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("token id 8000 at position 2") && err.contains("0..8000"),
        "{err}"
    );

    let broken = dir.join("broken.json");
    std::fs::write(&broken, "[1, 2,").unwrap();
    let (ok, _, err) = train(GPT2, &["--eval-only", "--tokens", broken.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("not a JSON array"), "{err}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn missing_data_and_unavailable_devices_say_what_to_do() {
    let empty = temp("nodata");
    let (ok, _, err) = common::run(LLAMA, Some(&empty), &["--corpus", "brown", "--steps", "1"]);
    assert!(!ok);
    assert!(err.contains("python3 tools/fetch_data.py brown"), "{err}");
    // This test binary is built without the `cuda` feature.
    let (ok, _, err) = train(GPT2, &["--device", "cuda", "--steps", "1"]);
    assert!(
        !ok && err.contains("--device cuda") && err.contains("--features cuda"),
        "{err}"
    );
    let (ok, _, err) = train(LLAMA, &["--device", "tpu", "--steps", "1"]);
    assert!(!ok && err.contains("use cpu, cuda or cuda:N"), "{err}");
    let (ok, _, err) = train(GPT2, &["--preset", "huge"]);
    assert!(!ok && err.contains("choose tiny or small"), "{err}");
}

#[test]
fn recompute_trains_the_same_model() {
    // Dropout on (GPT-2's default), so the replayed masks are part of what is compared.
    let losses = |name: &str, extra: &[&str]| {
        let dir = temp(name);
        let mut args = vec!["--steps", "3", "--out", dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        let (ok, _, err) = train(GPT2, &args);
        assert!(ok, "{name}: {err}");
        let m = metrics(&dir);
        std::fs::remove_dir_all(dir).ok();
        m.iter()
            .filter_map(|v| v["loss"].as_f64())
            .collect::<Vec<f64>>()
    };
    let plain = losses("plain", &[]);
    let recomputed = losses("recomputed", &["--recompute"]);
    assert_eq!(plain.len(), 3);
    for (a, b) in plain.iter().zip(&recomputed) {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs(),
            "{plain:?} vs {recomputed:?}"
        );
    }
}

#[test]
fn mixed_precision_trains_like_f32_and_resumes_exactly() {
    let run = |name: &str, extra: &[&str]| {
        let dir = temp(name);
        let mut args = vec!["--steps", "6", "--out", dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        let (ok, _, err) = train(GPT2, &args);
        assert!(ok, "{name}: {err}");
        dir
    };
    let single = run("f32", &[]);
    let half = run("f16", &["--dtype", "f16"]);
    let (a, b) = (metrics(&single), metrics(&half));
    let losses = |m: &[serde_json::Value]| -> Vec<f64> {
        m.iter().filter_map(|v| v["loss"].as_f64()).collect()
    };
    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len(), 6);
    // An f16 loss is rounded to 2⁻⁸ relative; the weights drift apart by f16 rounding.
    for (x, y) in la.iter().zip(&lb) {
        assert!((x - y).abs() <= 2e-2 * x.abs(), "{la:?} vs {lb:?}");
    }
    // bf16 (8 significant bits to f16's 11) trains without loss scaling.
    let brain = run("bf16", &["--dtype", "bf16"]);
    let lc = losses(&metrics(&brain));
    assert_eq!(lc.len(), 6);
    for (x, y) in la.iter().zip(&lc) {
        assert!((x - y).abs() <= 4e-2 * x.abs(), "{la:?} vs {lc:?}");
    }
    let s = json(&brain.join("summary.json"));
    assert_eq!(s["dtype"], "bf16");
    assert_eq!(s["loss_scale"], 1.0);
    assert_eq!(s["skipped_steps"], 0);

    let s = json(&half.join("summary.json"));
    assert_eq!(s["dtype"], "f16");
    assert_eq!(s["skipped_steps"], 0);
    assert_eq!(s["loss_scale"], 32768.0);
    assert!(s["peak_device_memory_bytes"].as_u64().unwrap() > 0);
    assert!(b
        .iter()
        .filter(|v| v.get("loss").is_some())
        .all(|v| v["loss_scale"] == 32768.0));

    // Stopped after step 3 and resumed without the flag: the checkpoint keeps f16 and the
    // scaler, and the metrics are those of the run that never stopped.
    let parts = temp("f16-parts");
    let p = parts.to_str().unwrap();
    let (ok, _, err) = train(
        GPT2,
        &[
            "--steps",
            "6",
            "--out",
            p,
            "--dtype",
            "f16",
            "--stop-after",
            "3",
        ],
    );
    assert!(ok, "{err}");
    let (ok, _, err) = train(GPT2, &["--steps", "6", "--resume", p]);
    assert!(ok, "{err}");
    assert!(err.contains("keeps its element type, --dtype f16"), "{err}");
    let strip = |m: Vec<serde_json::Value>| -> Vec<serde_json::Value> {
        m.into_iter()
            .map(|mut v| {
                v.as_object_mut().unwrap().remove("items_per_sec");
                v
            })
            .collect()
    };
    assert_eq!(strip(metrics(&parts)), strip(b));
    for d in [single, half, brain, parts] {
        std::fs::remove_dir_all(d).ok();
    }
}

#[test]
fn element_types_without_a_mixed_step_are_refused_with_the_alternatives() {
    let (ok, _, err) = train(LLAMA, &["--dtype", "f64", "--steps", "1"]);
    assert!(!ok && err.contains("use f32, f16 or bf16"), "{err}");
}
