//! The `model-summary` command: every preset prints, and mistakes name the choices.

use std::process::Command;

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_model-summary"))
        .args(args)
        .output()
        .expect("model-summary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_preset_prints_its_table() {
    for (arch, presets) in neural_arch_models::ARCHITECTURES {
        for (preset, summary) in *presets {
            let (ok, out, err) = run(&[arch, preset]);
            assert!(ok, "{arch} {preset}: {err}");
            let total = summary().total_params;
            let grouped = summary().to_string();
            assert_eq!(out, grouped, "{arch} {preset}");
            assert!(total > 0);
        }
    }
}

#[test]
fn json_and_list() {
    let (ok, out, _) = run(&["digits", "cnn", "--json"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
    assert_eq!(v["total_params"], 25_386);
    let (ok, out, _) = run(&["--list"]);
    assert!(ok);
    assert!(out.contains("digits:") && out.contains("25,386"), "{out}");
}

#[test]
fn unknown_names_list_the_choices() {
    let (ok, _, err) = run(&["gpt3", "small"]);
    assert!(!ok);
    assert!(
        err.contains("unknown architecture `gpt3`") && err.contains("digits"),
        "{err}"
    );
    let (ok, _, err) = run(&["digits", "huge"]);
    assert!(!ok);
    assert!(
        err.contains("no preset `huge`") && err.contains("mlp, cnn"),
        "{err}"
    );
}
