//! What the trainer tests share: a scratch directory, running a trainer binary, and reading
//! what a run leaves behind (`summary.json`, `metrics.jsonl`).

// Each test file uses its own subset.
#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// An empty directory `name` under cargo's scratch space for integration tests.
pub fn tmp(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `bin` with `args` and no progress bar, on the data sets in `data` when given:
/// (success, stdout, stderr).
pub fn run(bin: &str, data: Option<&Path>, args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(bin);
    cmd.args(args).arg("--no-progress");
    if let Some(d) = data {
        cmd.env("NEURAL_ARCH_DATA", d);
    }
    let out = cmd.output().expect("the trainer runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A JSON file, or a panic that names it.
pub fn json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The run's `summary.json`.
pub fn summary(dir: &Path) -> Value {
    json(&dir.join("summary.json"))
}

/// Every line of the run's `metrics.jsonl` without the throughput, which differs between any
/// two runs.
pub fn metrics(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).expect("a JSON line");
            v.as_object_mut()
                .expect("an object")
                .remove("items_per_sec");
            v
        })
        .collect()
}

/// (step, training loss) of every step line in `metrics.jsonl`.
pub fn losses(dir: &Path) -> Vec<(u64, f64)> {
    metrics(dir)
        .iter()
        .filter_map(|v| Some((v["step"].as_u64()?, v.get("loss")?.as_f64()?)))
        .collect()
}

/// The run of `outcome` (from [`run`]) failed with a message, not a panic, and its stderr holds
/// every one of `expected`.
pub fn assert_clear_error(outcome: (bool, String, String), expected: &[&str]) {
    let (ok, stdout, stderr) = outcome;
    assert!(!ok, "succeeded on bad input:\n{stdout}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for e in expected {
        assert!(stderr.contains(e), "stderr lacks `{e}`:\n{stderr}");
    }
}

/// Runs `bin` three times for a few steps, in `f32`, with `--dtype f16` and with `--dtype bf16`,
/// and checks that mixed precision trains the same model: per-step losses within the half
/// type's rounding of the `f32` ones, and a summary that records the element type and the loss
/// scale.
#[allow(dead_code)]
pub fn assert_mixed_precision_matches(bin: &str, data: Option<&Path>, args: &[&str], name: &str) {
    let run_with = |dtype: &str| {
        let out = tmp(&format!("{name}-{dtype}"));
        let mut a = args.to_vec();
        a.extend(["--dtype", dtype, "--out", out.to_str().unwrap()]);
        let (ok, stdout, stderr) = run(bin, data, &a);
        assert!(ok, "{name} --dtype {dtype} failed:\n{stdout}\n{stderr}");
        let l: Vec<f64> = losses(&out).into_iter().map(|(_, l)| l).collect();
        (out, l)
    };
    let (single, a) = run_with("f32");
    let (half, b) = run_with("f16");
    let (brain, c) = run_with("bf16");
    assert!(!a.is_empty() && a.len() == b.len(), "{a:?} vs {b:?}");
    assert_eq!(a.len(), c.len(), "{a:?} vs {c:?}");
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() <= 2e-2 * x.abs(),
            "{name}: {a:?} vs f16 {b:?}"
        );
    }
    // bf16 keeps 8 significant bits to f16's 11.
    for (x, y) in a.iter().zip(&c) {
        assert!(
            (x - y).abs() <= 4e-2 * x.abs(),
            "{name}: {a:?} vs bf16 {c:?}"
        );
    }
    let s = summary(&half);
    assert_eq!(s["dtype"], "f16", "{s}");
    assert!(s["loss_scale"].as_f64().unwrap() > 1.0, "{s}");
    assert!(s["peak_device_memory_bytes"].as_u64().unwrap() > 0, "{s}");
    // bf16 has f32's range: no scaling, as PyTorch advises.
    let s = summary(&brain);
    assert_eq!(s["dtype"], "bf16", "{s}");
    assert_eq!(s["loss_scale"], 1.0, "{s}");
    assert_eq!(s["skipped_steps"], 0, "{s}");
    for d in [single, half, brain] {
        std::fs::remove_dir_all(d).ok();
    }
}

/// What a finished (or killed) `mpirun` left: its exit status (`None` when the test had to
/// kill it), stdout, stderr, and how long it ran.
pub struct Outcome {
    pub status: Option<std::process::ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

/// Starts `mpirun -np <np> <bin> --distributed <args>`, one thread per rank, with output to
/// files in `dir`.
pub fn launch(
    np: usize,
    bin: &str,
    args: &[&str],
    dir: &Path,
    data: Option<&Path>,
) -> std::process::Child {
    let out = std::fs::File::create(dir.join("mpirun.out")).unwrap();
    let err = std::fs::File::create(dir.join("mpirun.err")).unwrap();
    let mut cmd = Command::new("mpirun");
    if let Some(d) = data {
        cmd.env("NEURAL_ARCH_DATA", d);
    }
    cmd.args([
        "--oversubscribe",
        "-np",
        &np.to_string(),
        bin,
        "--distributed",
    ])
    .args(args)
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    .env("RAYON_NUM_THREADS", "1")
    .stdin(Stdio::null())
    .stdout(out)
    .stderr(err)
    .spawn()
    .expect("mpirun starts (install Open MPI with `bash tools/install-openmpi.sh`)")
}

/// Waits for `child` at most `limit`; kills it after that (a hung job fails the test instead of
/// hanging it).
pub fn finish(
    mut child: std::process::Child,
    dir: &Path,
    started: Instant,
    limit: Duration,
) -> Outcome {
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Outcome {
        status,
        stdout: std::fs::read_to_string(dir.join("mpirun.out")).unwrap_or_default(),
        stderr: std::fs::read_to_string(dir.join("mpirun.err")).unwrap_or_default(),
        took: started.elapsed(),
    }
}

pub fn mpirun(np: usize, bin: &str, args: &[&str], dir: &Path, data: Option<&Path>) -> Outcome {
    let started = Instant::now();
    let child = launch(np, bin, args, dir, data);
    finish(child, dir, started, Duration::from_secs(600))
}

pub fn succeeded(o: &Outcome) -> bool {
    o.status.is_some_and(|s| s.success())
}
