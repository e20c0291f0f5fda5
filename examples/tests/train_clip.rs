//! `train-clip` on generated scenes (no fetched data): a short run, the summary, the checkpoint,
//! the similarity picture, a falling loss, an exact resume; emoji from a small synthetic set in
//! a temporary `NEURAL_ARCH_DATA`; and the errors for a damaged or missing emoji set.

mod common;

use common::{metrics, summary};
use serde_json::Value;
use std::path::{Path, PathBuf};

const BIN: &str = env!("CARGO_BIN_EXE_train-clip");

fn tmp(name: &str) -> PathBuf {
    common::tmp(&format!("clip-{name}"))
}

fn run(data: &Path, args: &[&str]) -> (bool, String, String) {
    common::run(BIN, Some(data), args)
}

/// The training losses, in step order.
fn losses(dir: &Path) -> Vec<f64> {
    common::losses(dir).into_iter().map(|(_, l)| l).collect()
}

const STEPS: &[&str] = &[
    "--steps",
    "16",
    "--batch-size",
    "16",
    "--lr",
    "2e-3",
    "--eval-every",
    "8",
    "--eval-size",
    "16",
];

#[test]
fn trains_on_scenes_and_resumes_exactly() {
    let data = tmp("no-data");
    let whole = tmp("whole");
    let mut args = STEPS.to_vec();
    args.extend(["--out", whole.to_str().unwrap()]);
    let (ok, stdout, stderr) = run(&data, &args);
    assert!(ok, "train-clip failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("image of \""),
        "no sample retrievals:\n{stdout}"
    );
    let s = summary(&whole);
    for field in [
        "model",
        "preset",
        "params",
        "steps",
        "train_loss",
        "eval_loss",
        "r_at_1",
        "r_at_10",
        "chance_r_at_1",
        "zero_shot_colour",
        "zero_shot_shape",
        "zero_shot_colour_seen",
        "zero_shot_shape_seen",
        "images_per_sec",
        "peak_rss_bytes",
        "device",
        "dtype",
        "wall_seconds",
    ] {
        assert!(s.get(field).is_some(), "no {field} in {s}");
    }
    assert_eq!(s["model"], "clip");
    assert_eq!(s["preset"], "tiny");
    assert_eq!(s["params"], 2_265_857);
    assert_eq!(s["steps"], 16);
    for k in ["r_at_1", "r_at_10", "zero_shot_colour", "chance_r_at_1"] {
        let v = s[k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{k} = {v}");
    }
    assert!(s["eval_loss"].as_f64().unwrap().is_finite());
    assert!(whole.join("checkpoint/model.safetensors").exists());
    assert!(whole.join("vocab.json").exists());
    let png = std::fs::read(whole.join("similarity.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");

    let l = losses(&whole);
    assert_eq!(l.len(), 16);
    let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
    let (first, last) = (mean(&l[..4]), mean(&l[12..]));
    assert!(
        last < first,
        "the loss did not go down: first steps {first:.4}, last {last:.4}"
    );

    // Stopped after step 5 and resumed: the same metrics, line for line.
    let parts = tmp("parts");
    let mut args = STEPS.to_vec();
    args.extend(["--out", parts.to_str().unwrap(), "--stop-after", "5"]);
    let (ok, stdout, stderr) = run(&data, &args);
    assert!(ok, "{stdout}\n{stderr}");
    assert_eq!(summary(&parts)["steps"], 5);
    let (ok, stdout, stderr) = run(&data, &["--resume", parts.to_str().unwrap()]);
    assert!(ok, "--resume failed:\n{stdout}\n{stderr}");
    assert_eq!(metrics(&whole), metrics(&parts));
    assert_eq!(summary(&parts)["r_at_1"], s["r_at_1"]);

    // --eval-only scores the checkpoint: the final evaluation again, and the picture.
    std::fs::remove_file(parts.join("similarity.png")).unwrap();
    let (ok, stdout, stderr) = run(
        &data,
        &[
            "--resume",
            parts.to_str().unwrap(),
            "--eval-only",
            "--eval-size",
            "16",
        ],
    );
    assert!(ok, "--eval-only failed:\n{stdout}\n{stderr}");
    let again = summary(&parts);
    let (a, b) = (
        again["eval_loss"].as_f64().unwrap(),
        s["eval_loss"].as_f64().unwrap(),
    );
    assert!((a - b).abs() < 1e-5, "eval-only {a} vs end of training {b}");
    assert!(parts.join("similarity.png").exists());

    // Another --data cannot continue this run.
    let (ok, _, stderr) = run(
        &data,
        &["--resume", parts.to_str().unwrap(), "--data", "emoji"],
    );
    assert!(!ok && stderr.contains("--data scenes"), "{stderr}");
}

/// A data directory with `emoji/` holding `n` small RGBA emoji and their `emoji.json`.
fn synthetic_emoji(name: &str, n: usize) -> PathBuf {
    let root = tmp(name);
    let dir = root.join("emoji");
    std::fs::create_dir_all(dir.join("64")).unwrap();
    std::fs::write(dir.join(".sha256"), "synthetic\n").unwrap();
    let mut list = Vec::new();
    for i in 0..n {
        let file = format!("e{i}.png");
        let mut bytes = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut bytes, 8, 8);
            enc.set_color(png::ColorType::Rgba);
            enc.set_depth(png::BitDepth::Eight);
            let mut w = enc.write_header().unwrap();
            let px: Vec<u8> = (0..64)
                .flat_map(|k| [(i * 40 % 256) as u8, (k * 4) as u8, 90, (k % 2 * 255) as u8])
                .collect();
            w.write_image_data(&px).unwrap();
        }
        std::fs::write(dir.join("64").join(&file), bytes).unwrap();
        list.push(serde_json::json!({ "name": format!("TEST FACE NUMBER {i}"), "image": file }));
    }
    std::fs::write(dir.join("emoji.json"), Value::Array(list).to_string()).unwrap();
    root
}

#[test]
fn trains_on_emoji_and_scenes() {
    let data = synthetic_emoji("emoji-data", 40);
    let out = tmp("both");
    let (ok, stdout, stderr) = run(
        &data,
        &[
            "--data",
            "both",
            "--steps",
            "2",
            "--batch-size",
            "8",
            "--eval-size",
            "8",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(ok, "{stdout}\n{stderr}");
    let s = summary(&out);
    assert!(s.get("emoji_r_at_1").is_some(), "{s}");
    let vocab = std::fs::read_to_string(out.join("vocab.json")).unwrap();
    assert!(
        vocab.contains("\"face\"") && vocab.contains("\"both\""),
        "{vocab}"
    );
}

fn fails_with(data: &Path, expected: &[&str]) {
    common::assert_clear_error(
        run(
            data,
            &[
                "--data",
                "emoji",
                "--steps",
                "1",
                "--out",
                tmp("bad-out").to_str().unwrap(),
            ],
        ),
        expected,
    );
}

#[test]
fn bad_or_missing_emoji_is_a_clear_error() {
    let data = synthetic_emoji("broken-json", 3);
    std::fs::write(
        data.join("emoji/emoji.json"),
        "[{\"name\": \"grinning face\", ",
    )
    .unwrap();
    fails_with(
        &data,
        &[
            "emoji.json",
            "not valid JSON",
            "python3 tools/fetch_data.py emoji",
        ],
    );

    let data = synthetic_emoji("no-name", 3);
    std::fs::write(data.join("emoji/emoji.json"), "[{\"image\": \"e0.png\"}]").unwrap();
    fails_with(&data, &["emoji.json", "entry 0"]);

    let data = synthetic_emoji("bad-png", 30);
    std::fs::write(data.join("emoji/64/e2.png"), b"not a png").unwrap();
    fails_with(&data, &["e2.png", "not a readable PNG"]);

    fails_with(&tmp("no-emoji"), &["python3 tools/fetch_data.py emoji"]);
}

#[test]
fn mixed_precision_trains_like_f32() {
    let mut args = STEPS.to_vec();
    args[1] = "3";
    common::assert_mixed_precision_matches(BIN, Some(&tmp("mixed-no-data")), &args, "clip-mixed");
}
