//! `train-vit` and `train-resnet` on a tiny synthetic data set in Fashion-MNIST's format
//! (gzipped IDX files in a temporary `NEURAL_ARCH_DATA`): short runs, the summary, the
//! checkpoint, a falling loss, resume; and the errors for damaged or missing data.

mod common;

use common::{losses, tmp};
use flate2::write::GzEncoder;
use flate2::Compression;
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};

const SIDE: usize = 28;

fn idx(magic: u32, dims: &[usize], body: &[u8]) -> Vec<u8> {
    let mut v = magic.to_be_bytes().to_vec();
    for &d in dims {
        v.extend_from_slice(&(d as u32).to_be_bytes());
    }
    v.extend_from_slice(body);
    v
}

fn write_gz(path: &Path, bytes: &[u8]) {
    let mut gz = GzEncoder::new(std::fs::File::create(path).unwrap(), Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap();
}

/// `n` images whose class is the size of a centred bright square (invariant under the
/// crops and flips of the augmentation), with a little deterministic noise.
fn images(n: usize, salt: usize) -> (Vec<u8>, Vec<u8>) {
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for i in 0..n {
        let class = (i * 7 + salt) % 10;
        let half = 2 + class;
        for r in 0..SIDE {
            for c in 0..SIDE {
                let inside = r.abs_diff(13) < half && c.abs_diff(13) < half;
                let noise = ((i * 31 + r * 17 + c * 13) % 23) as u8;
                pixels.push(if inside { 230 - noise } else { noise });
            }
        }
        labels.push(class as u8);
    }
    (pixels, labels)
}

/// A data directory holding `fashion-mnist/` with 64 training and 32 test images.
fn synthetic_data(name: &str) -> PathBuf {
    let root = tmp(name);
    let dir = root.join("fashion-mnist");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(".sha256"), "synthetic\n").unwrap();
    for (prefix, n, salt) in [("train", 64, 0), ("t10k", 32, 3)] {
        let (pixels, labels) = images(n, salt);
        write_gz(
            &dir.join(format!("{prefix}-images-idx3-ubyte.gz")),
            &idx(0x803, &[n, SIDE, SIDE], &pixels),
        );
        write_gz(
            &dir.join(format!("{prefix}-labels-idx1-ubyte.gz")),
            &idx(0x801, &[n], &labels),
        );
    }
    root
}

fn run(bin: &str, data: &Path, args: &[&str]) -> (bool, String, String) {
    common::run(bin, Some(data), args)
}

fn trains_and_resumes(bin: &str, name: &str, params: u64) {
    let data = synthetic_data(&format!("{name}-data"));
    let out = tmp(&format!("{name}-run"));
    let out_s = out.to_str().unwrap();
    let (ok, stdout, stderr) = run(
        bin,
        &data,
        &[
            "--steps",
            "16",
            "--batch-size",
            "8",
            "--lr",
            "3e-3",
            "--eval-every",
            "8",
            "--checkpoint-every",
            "8",
            "--out",
            out_s,
        ],
    );
    assert!(ok, "{name} failed:\n{stdout}\n{stderr}");
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    for field in [
        "model",
        "preset",
        "params",
        "steps",
        "train_loss",
        "eval_loss",
        "accuracy",
        "images_per_sec",
        "peak_rss_bytes",
        "device",
        "dtype",
        "wall_seconds",
    ] {
        assert!(summary.get(field).is_some(), "no {field} in {summary}");
    }
    assert_eq!(summary["model"], name);
    assert_eq!(summary["preset"], "tiny");
    assert_eq!(summary["params"], params);
    assert_eq!(summary["steps"], 16);
    let acc = summary["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc), "{summary}");
    assert!(summary["eval_loss"].as_f64().unwrap().is_finite());
    assert!(out.join("checkpoint").join("model.safetensors").exists());

    let l = losses(&out);
    assert_eq!(l.len(), 16);
    let mean = |x: &[(u64, f64)]| x.iter().map(|v| v.1).sum::<f64>() / x.len() as f64;
    let (first, last) = (mean(&l[..4]), mean(&l[12..]));
    assert!(
        last < first,
        "{name}: the loss did not go down: first steps {first:.4}, last {last:.4}"
    );

    let (ok, stdout, stderr) = run(bin, &data, &["--resume", out_s, "--steps", "20"]);
    assert!(ok, "{name} --resume failed:\n{stdout}\n{stderr}");
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"], 20);
    let steps: Vec<u64> = losses(&out).iter().map(|x| x.0).collect();
    assert_eq!(steps, (1..=20).collect::<Vec<_>>());

    // --eval-only --resume scores the checkpoint's weights: the final evaluation again.
    let (ok, stdout, stderr) = run(bin, &data, &["--resume", out_s, "--eval-only"]);
    assert!(ok, "{name} --eval-only failed:\n{stdout}\n{stderr}");
    let again: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let (a, b) = (
        again["eval_loss"].as_f64().unwrap(),
        summary["eval_loss"].as_f64().unwrap(),
    );
    assert!(
        (a - b).abs() < 1e-5,
        "{name}: eval-only {a} vs end of training {b}"
    );
}

#[test]
fn vit_trains_and_resumes() {
    trains_and_resumes(env!("CARGO_BIN_EXE_train-vit"), "vit", 809_354);
}

#[test]
fn resnet_trains_and_resumes() {
    trains_and_resumes(env!("CARGO_BIN_EXE_train-resnet"), "resnet", 78_042);
}

/// ViT (no BatchNorm, no dropout) on two processes computes what it does on one, and only
/// rank 0 draws the attention picture; ResNet's BatchNorm normalises each rank's half, so its
/// group trains close to one process (within 3 % here), not equal to it.
#[cfg(feature = "mpi")]
#[test]
fn image_models_train_in_a_group_of_two() {
    let data = synthetic_data("group-data");
    let args = ["--steps", "4", "--batch-size", "8", "--eval-every", "2"];
    for (bin, name, tolerance) in [
        (env!("CARGO_BIN_EXE_train-vit"), "vit", 1e-4),
        (env!("CARGO_BIN_EXE_train-resnet"), "resnet", 0.1),
    ] {
        let one = tmp(&format!("{name}-group-one"));
        let mut a = args.to_vec();
        a.extend(["--out", one.to_str().unwrap()]);
        let (ok, stdout, stderr) = run(bin, &data, &a);
        assert!(ok, "{stdout}\n{stderr}");
        let two = tmp(&format!("{name}-group-two"));
        let mut a = args.to_vec();
        let out = two.join("run");
        a.extend(["--out", out.to_str().unwrap()]);
        let o = common::mpirun(2, bin, &a, &two, Some(&data));
        assert!(common::succeeded(&o), "{}\n{}", o.stdout, o.stderr);
        let (a, b) = (losses(&one), losses(&out));
        assert_eq!(a.len(), b.len());
        for ((s, x), (_, y)) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() <= tolerance * x.abs(),
                "{name} step {s}: one process {x}, two {y}"
            );
        }
        assert_eq!(
            one.join("attention.png").exists(),
            out.join("attention.png").exists()
        );
        assert_eq!(o.stdout.matches("done:").count(), 1, "{}", o.stdout);

        // Each rank evaluated half of the test images, with rank 0's model (ResNet's running
        // statistics included): together, what one process scores on rank 0's checkpoint.
        let summary = |dir: &Path| -> Value {
            serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap())
                .unwrap()
        };
        let group = summary(&out);
        let (ok, stdout, stderr) = run(
            bin,
            &data,
            &["--resume", out.to_str().unwrap(), "--eval-only"],
        );
        assert!(ok, "{name} --eval-only failed:\n{stdout}\n{stderr}");
        let alone = summary(&out);
        for key in ["eval_loss", "accuracy"] {
            let (a, b) = (group[key].as_f64().unwrap(), alone[key].as_f64().unwrap());
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{name} {key}: two ranks' shards {a}, rank 0's checkpoint alone {b}"
            );
        }
    }
}

fn fails_with(data: &Path, expected: &[&str]) {
    common::assert_clear_error(
        run(
            env!("CARGO_BIN_EXE_train-resnet"),
            data,
            &[
                "--steps",
                "1",
                "--out",
                tmp("resnet-bad-out").to_str().unwrap(),
            ],
        ),
        expected,
    );
}

#[test]
fn bad_or_missing_data_is_a_clear_error() {
    let data = synthetic_data("bad-magic");
    let file = data.join("fashion-mnist/train-images-idx3-ubyte.gz");
    write_gz(&file, &idx(0x801, &[1, SIDE, SIDE], &[0; SIDE * SIDE]));
    fails_with(
        &data,
        &[
            "train-images-idx3-ubyte.gz",
            "wrong magic number",
            "fetch_data.py",
        ],
    );

    let data = synthetic_data("truncated");
    let file = data.join("fashion-mnist/t10k-labels-idx1-ubyte.gz");
    write_gz(&file, &idx(0x801, &[32], &[1; 20]));
    fails_with(&data, &["t10k-labels-idx1-ubyte.gz", "truncated"]);

    let data = synthetic_data("mismatch");
    let file = data.join("fashion-mnist/train-labels-idx1-ubyte.gz");
    write_gz(&file, &idx(0x801, &[63], &[1; 63]));
    fails_with(&data, &["64 images", "63 labels"]);

    let data = synthetic_data("bad-label");
    let file = data.join("fashion-mnist/train-labels-idx1-ubyte.gz");
    let mut labels = vec![1u8; 64];
    labels[5] = 10;
    write_gz(&file, &idx(0x801, &[64], &labels));
    fails_with(
        &data,
        &["train-labels-idx1-ubyte.gz", "label 10 of image 5"],
    );

    let empty = tmp("no-data");
    fails_with(&empty, &["python3 tools/fetch_data.py fashion-mnist"]);
}

#[test]
fn epochs_count_the_training_images() {
    let data = synthetic_data("epochs-data");
    let out = tmp("epochs-run");
    let (ok, stdout, stderr) = run(
        env!("CARGO_BIN_EXE_train-resnet"),
        &data,
        &[
            "--epochs",
            "0.5",
            "--batch-size",
            "8",
            "--eval-limit",
            "8",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(ok, "{stdout}\n{stderr}");
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    // Half of the 64 training images, 8 per step.
    assert_eq!(summary["steps"], 4, "{summary}");
}

#[test]
fn recompute_is_refused_by_a_model_without_recomputed_blocks() {
    let data = synthetic_data("recompute");
    let (ok, _, err) = run(
        env!("CARGO_BIN_EXE_train-vit"),
        &data,
        &["--recompute", "--steps", "1"],
    );
    assert!(
        !ok && err.contains("--recompute: vit declares no recomputed blocks"),
        "{err}"
    );
}

#[test]
fn mixed_precision_trains_like_f32() {
    let data = synthetic_data("mixed-data");
    let args = [
        "--steps",
        "3",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--eval-every",
        "3",
    ];
    for (bin, name) in [
        (env!("CARGO_BIN_EXE_train-vit"), "vit-mixed"),
        (env!("CARGO_BIN_EXE_train-resnet"), "resnet-mixed"),
    ] {
        common::assert_mixed_precision_matches(bin, Some(&data), &args, name);
    }
}
