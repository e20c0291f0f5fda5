//! `train-bert` on small synthetic data sets in the fetched formats (Brown `word/tag` files,
//! VADER's snippet file, UCI's JSON), in a temporary `NEURAL_ARCH_DATA`: masked-LM training,
//! the summary, the checkpoint, a falling loss, fine-tuning from the
//! masked-LM checkpoint, an exact resume; and the errors for a damaged or missing data set.

mod common;

use common::{losses, summary, tmp};
use serde_json::Value;
use std::path::{Path, PathBuf};

const BIN: &str = env!("CARGO_BIN_EXE_train-bert");

const GOOD: [&str; 6] = [
    "wonderful",
    "moving",
    "brilliant",
    "funny",
    "charming",
    "great",
];
const BAD: [&str; 6] = ["dull", "tedious", "boring", "awful", "clumsy", "weak"];
const NOUNS: [&str; 5] = ["film", "movie", "story", "cast", "script"];

fn sentence(i: usize, good: bool) -> String {
    let adj = if good { GOOD } else { BAD };
    format!(
        "the {} is {} and {} .",
        NOUNS[i % 5],
        adj[i % 6],
        adj[(i / 6 + 1) % 6]
    )
}

/// A data directory with `brown/` (10 texts), `vader/` (200 snippets) and `sentiment/`.
fn synthetic_data(name: &str, snippets: Option<&str>) -> PathBuf {
    let root = tmp(name);
    let mark = |d: &Path| std::fs::write(d.join(".sha256"), "synthetic\n").unwrap();
    let brown = root.join("brown");
    std::fs::create_dir_all(&brown).unwrap();
    mark(&brown);
    for f in 0..10 {
        let text: String = (0..20)
            .map(|i| {
                let s = sentence(f * 20 + i, i % 2 == 0);
                let tagged: Vec<String> = s.split(' ').map(|w| format!("{w}/nn")).collect();
                tagged.join(" ") + "\n"
            })
            .collect();
        std::fs::write(brown.join(format!("ca{f:02}")), text).unwrap();
    }
    let vader = root.join("vader");
    std::fs::create_dir_all(&vader).unwrap();
    mark(&vader);
    let text = snippets.map(str::to_string).unwrap_or_else(|| {
        (1..=200)
            .map(|id| {
                let good = id % 3 != 0;
                let rating = if good { 2.5 } else { -2.0 };
                format!("{id}\t{rating}\t{}\n", sentence(id * 7, good))
            })
            .collect()
    });
    std::fs::write(vader.join("movieReviewSnippets_GroundTruth.txt"), text).unwrap();
    let uci = root.join("sentiment");
    std::fs::create_dir_all(&uci).unwrap();
    mark(&uci);
    for site in ["imdb", "yelp", "amazon"] {
        let v: Vec<Value> = (0..10)
            .map(|i| serde_json::json!({"text": sentence(i * 11, i % 2 == 1), "class": i % 2}))
            .collect();
        std::fs::write(
            uci.join(format!("{site}.json")),
            Value::Array(v).to_string(),
        )
        .unwrap();
    }
    root
}

fn run(data: &Path, args: &[&str]) -> (bool, String, String) {
    common::run(BIN, Some(data), args)
}

const MLM: [&str; 12] = [
    "--steps",
    "12",
    "--batch-size",
    "8",
    "--context",
    "16",
    "--lr",
    "3e-3",
    "--eval-every",
    "6",
    "--eval-examples",
    "16",
];

#[test]
fn masked_lm_trains_and_fine_tunes() {
    let data = synthetic_data("bert-data", None);
    let a = tmp("bert-mlm-a");
    let mut args = MLM.to_vec();
    args.extend(["--out", a.to_str().unwrap()]);
    let (ok, stdout, stderr) = run(&data, &args);
    assert!(ok, "train-bert failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("masked [guess|truth]:"), "{stdout}");
    let s = summary(&a);
    for field in [
        "model",
        "preset",
        "params",
        "steps",
        "train_loss",
        "eval_loss",
        "masked_accuracy",
        "tokens_per_sec",
        "peak_rss_bytes",
        "device",
        "dtype",
        "wall_seconds",
    ] {
        assert!(s.get(field).is_some(), "no {field} in {s}");
    }
    assert_eq!(
        (s["model"].as_str(), s["steps"].as_u64()),
        (Some("bert-mlm"), Some(12))
    );
    assert_eq!(s["params"], 1_858_752);
    assert!(a.join("checkpoint").join("model.safetensors").exists());
    assert!(a.join("tokenizer.json").exists());
    let la = losses(&a);
    let mean = |l: &[(u64, f64)]| l.iter().map(|x| x.1).sum::<f64>() / l.len() as f64;
    assert!(
        mean(&la[9..]) < mean(&la[..3]),
        "the loss did not go down: {la:?}"
    );

    // Fine-tuning from the masked-LM checkpoint, with its tokenizer.
    let c = tmp("bert-sentiment");
    let init = a.join("checkpoint").join("model.safetensors");
    let (ok, stdout, stderr) = run(
        &data,
        &[
            "--task",
            "sentiment",
            "--init-from",
            init.to_str().unwrap(),
            "--steps",
            "10",
            "--batch-size",
            "8",
            "--lr",
            "1e-3",
            "--out",
            c.to_str().unwrap(),
        ],
    );
    assert!(ok, "fine-tuning failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("new: bert.pooler.dense.weight, bert.pooler.dense.bias, classifier"),
        "{stdout}"
    );
    let s = summary(&c);
    assert_eq!(s["model"], "bert-sentiment");
    for field in ["accuracy", "ood_accuracy", "ood_accuracy_imdb", "eval_loss"] {
        let v = s[field].as_f64().unwrap_or(-1.0);
        assert!(
            (0.0..=1.0).contains(&v) || field == "eval_loss",
            "{field}: {s}"
        );
    }
    assert_eq!(
        std::fs::read(c.join("tokenizer.json")).unwrap(),
        std::fs::read(a.join("tokenizer.json")).unwrap()
    );
}

#[test]
fn damaged_or_missing_data_is_named_with_the_fix() {
    let data = synthetic_data(
        "bert-bad-data",
        Some("1\t2.5\tfine film .\n2\tgreat film with no rating\n"),
    );
    let out = tmp("bert-bad-out");
    let (ok, _, stderr) = run(&data, &["--steps", "1", "--out", out.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains("movieReviewSnippets_GroundTruth.txt, line 2")
            && stderr.contains("python3 tools/fetch_data.py vader --force"),
        "{stderr}"
    );
    let data = synthetic_data("bert-bad-data2", None);
    std::fs::remove_dir_all(data.join("sentiment")).unwrap();
    let (ok, _, stderr) = run(
        &data,
        &[
            "--task",
            "sentiment",
            "--steps",
            "1",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(!ok);
    assert!(
        stderr.contains("python3 tools/fetch_data.py sentiment"),
        "{stderr}"
    );
    // A fine-tuning start without the tokenizer it was trained with.
    let lone = tmp("bert-lone").join("model.safetensors");
    std::fs::write(&lone, b"").unwrap();
    let (ok, _, stderr) = run(
        &data,
        &[
            "--task",
            "sentiment",
            "--init-from",
            lone.to_str().unwrap(),
            "--steps",
            "1",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(!ok);
    assert!(stderr.contains("pass it with --tokenizer FILE"), "{stderr}");
}

/// Two fresh runs train their own WordPiece vocabulary, so this also checks that training it
/// is deterministic across processes (it once was not: every loss differed from step 1).
#[test]
fn masked_lm_resumes_exactly() {
    let data = synthetic_data("bert-data-resume", None);
    let a = tmp("bert-mlm-resume-a");
    let mut args = MLM.to_vec();
    args.extend(["--out", a.to_str().unwrap()]);
    let (ok, stdout, stderr) = run(&data, &args);
    assert!(ok, "{stdout}\n{stderr}");
    let la = losses(&a);
    let s = summary(&a);
    // Stopped at step 6 and resumed: the same losses as the uninterrupted run.
    let b = tmp("bert-mlm-b");
    let mut args = MLM.to_vec();
    args.extend(["--out", b.to_str().unwrap(), "--stop-after", "6"]);
    let (ok, stdout, stderr) = run(&data, &args);
    assert!(ok, "{stdout}\n{stderr}");
    assert_eq!(losses(&b).len(), 6);
    let (ok, stdout, stderr) = run(&data, &["--resume", b.to_str().unwrap()]);
    assert!(ok, "--resume failed:\n{stdout}\n{stderr}");
    assert_eq!(losses(&b), la);
    assert_eq!(summary(&b)["eval_loss"], s["eval_loss"]);
}

#[test]
fn mixed_precision_trains_like_f32() {
    let data = synthetic_data("bert-mixed-data", None);
    let mut args = MLM.to_vec();
    args[1] = "3";
    common::assert_mixed_precision_matches(BIN, Some(&data), &args, "bert-mixed");
}

/// Fails unless each of `keys` is the same in the two summaries, to `1e-5`.
#[cfg(feature = "mpi")]
fn assert_same_metrics(keys: &[&str], group: &Value, alone: &Value) {
    for key in keys {
        let (a, b) = (group[key].as_f64().unwrap(), alone[key].as_f64().unwrap());
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
            "{key}: two ranks' shards {a}, rank 0's checkpoint alone {b}"
        );
    }
}

/// A group of two trains the masked LM (each rank pads and encodes its own shard of the batch),
/// and its two ranks each evaluate half of the validation sequences with rank 0's model:
/// together, what one process scores on rank 0's checkpoint. The same for the sentiment
/// fine-tuning that starts from it: the held-out snippets and each site's sentences are split
/// between the ranks.
#[cfg(feature = "mpi")]
#[test]
fn masked_lm_trains_in_a_group_of_two_and_evaluates_in_shards() {
    let data = synthetic_data("bert-group-data", None);
    let dir = tmp("bert-group");
    let out = dir.join("run");
    let mut args = MLM.to_vec();
    args[1] = "4";
    args.extend(["--out", out.to_str().unwrap()]);
    let o = common::mpirun(2, BIN, &args, &dir, Some(&data));
    assert!(common::succeeded(&o), "{}\n{}", o.stdout, o.stderr);
    let group = summary(&out);
    assert_eq!(group["steps"], 4);
    assert_eq!(losses(&out).len(), 4);
    let (ok, stdout, stderr) = run(&data, &["--resume", out.to_str().unwrap(), "--eval-only"]);
    assert!(ok, "--eval-only failed:\n{stdout}\n{stderr}");
    assert_same_metrics(&["eval_loss", "masked_accuracy"], &group, &summary(&out));

    let tuned = dir.join("tuned");
    let init = out.join("checkpoint").join("model.safetensors");
    let args = [
        "--task",
        "sentiment",
        "--init-from",
        init.to_str().unwrap(),
        "--steps",
        "4",
        "--batch-size",
        "8",
        "--lr",
        "1e-3",
        "--out",
        tuned.to_str().unwrap(),
    ];
    let o = common::mpirun(2, BIN, &args, &dir, Some(&data));
    assert!(common::succeeded(&o), "{}\n{}", o.stdout, o.stderr);
    let group = summary(&tuned);
    assert_eq!(group["steps"], 4);
    let (ok, stdout, stderr) = run(&data, &["--resume", tuned.to_str().unwrap(), "--eval-only"]);
    assert!(ok, "--eval-only failed:\n{stdout}\n{stderr}");
    let keys = ["eval_loss", "accuracy", "ood_accuracy", "ood_accuracy_imdb"];
    assert_same_metrics(&keys, &group, &summary(&tuned));
}
