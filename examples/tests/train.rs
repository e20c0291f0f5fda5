//! Short training runs through the library function the `train-digits` binary uses, and the
//! binary's handling of bad arguments.

use std::path::PathBuf;
use std::process::Command;

use neural_arch_examples::{train_digits, DigitsConfig, DigitsSummary};

fn out_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn short_training_beats_chance_and_writes_the_summary() {
    let out = out_dir("digits-short");
    let cfg = DigitsConfig {
        epochs: 5,
        batch_size: 32,
        out: out.clone(),
        ..DigitsConfig::default()
    };
    let s: DigitsSummary = train_digits(&cfg).unwrap();
    assert!(s.test_accuracy > 0.8, "test accuracy {}", s.test_accuracy);
    assert_eq!((s.train_examples, s.test_examples), (1438, 359));
    assert_eq!(s.steps, 5 * 1438usize.div_ceil(32));
    assert_eq!(s.history.len(), 5);
    assert!(s.history[4].train_loss < s.history[0].train_loss);

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    for field in [
        "model",
        "params",
        "train_examples",
        "test_examples",
        "epochs",
        "steps",
        "test_accuracy",
        "final_train_loss",
        "wall_seconds",
    ] {
        assert!(
            json.get(field).is_some(),
            "summary.json lacks {field}: {json}"
        );
    }
    assert_eq!(json["model"], "DigitsMlp<64>");
    assert_eq!(json["params"], 64 * 64 + 64 + 64 * 10 + 10);
    let acc = json["test_accuracy"].as_f64().unwrap();
    assert!(
        (acc - s.test_accuracy).abs() < 1e-12,
        "{acc} vs {}",
        s.test_accuracy
    );

    // Same seed, same run.
    let again = train_digits(&DigitsConfig {
        out: out_dir("digits-short-again"),
        ..cfg
    })
    .unwrap();
    assert_eq!(again.test_correct, s.test_correct);
    assert_eq!(again.final_train_loss, s.final_train_loss);
}

#[test]
fn unusable_out_dir_is_an_error() {
    let file = out_dir("digits-not-a-dir");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, "a file, not a directory").unwrap();
    let err = train_digits(&DigitsConfig {
        epochs: 1,
        out: file.join("sub"),
        ..DigitsConfig::default()
    })
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("cannot create output directory"),
        "{err:#}"
    );
}

fn run_bin(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_train-digits"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn binary_reports_bad_arguments_without_panicking() {
    let dir = out_dir("digits-bin");
    let dir = dir.to_str().unwrap();
    for (args, expect) in [
        (vec!["--batch-size", "0"], "--batch-size must be at least 1"),
        (vec!["--epochs", "0"], "--epochs must be at least 1"),
        (vec!["--lr", "-0.1"], "--lr must be a positive number"),
        (vec!["--hidden", "100"], "--hidden must be one of"),
    ] {
        let mut all = args.clone();
        all.extend(["--out", dir]);
        let (ok, stderr) = run_bin(&all);
        assert!(!ok, "{args:?} succeeded");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn the_cnn_declared_with_model_trains_on_the_digits() {
    let cfg = DigitsConfig {
        model: neural_arch_examples::DigitsModel::Cnn,
        epochs: 1,
        batch_size: 32,
        lr: 3e-3,
        out: out_dir("digits-cnn"),
        ..DigitsConfig::default()
    };
    let s = train_digits(&cfg).unwrap();
    assert_eq!(s.model, "DigitsCnn");
    // One epoch is far above chance (10 %); the full run reaches 99 % (README).
    assert!(s.test_accuracy > 0.8, "test accuracy {}", s.test_accuracy);
}
