//! Data-parallel training across processes (`--distributed`, the `mpi` feature), launched by
//! Open MPI's `mpirun` as a user would: two processes compute what one does on the same global
//! batch (GPT-2, Llama, and CLIP's contrastive loss through an all-gather), a stopped group
//! resumes exactly, SIGUSR1 stops a group with a checkpoint, and a rank that dies or hangs ends
//! the job with an error instead of leaving the others waiting.
//!
//! Needs `mpirun` on the PATH (`bash tools/install-openmpi.sh`).
#![cfg(feature = "mpi")]

mod common;

use common::{finish, json, launch, metrics, mpirun, succeeded, Outcome};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const GPT2: &str = env!("CARGO_BIN_EXE_train-gpt2");
const CLIP: &str = env!("CARGO_BIN_EXE_train-clip");
const LLAMA: &str = env!("CARGO_BIN_EXE_train-llama");

fn temp(name: &str) -> PathBuf {
    common::tmp(&format!("dist-{name}"))
}

/// Small GPT-2 settings: a global batch of 4 sequences of 16 tokens.
const SMALL: &[&str] = &[
    "--corpus",
    "embedded",
    "--batch-size",
    "4",
    "--context",
    "16",
    "--eval-tokens",
    "256",
    "--sample-tokens",
    "4",
    "--eval-every",
    "4",
];

/// The training losses and the evaluations of a run's `metrics.jsonl`.
fn numbers(dir: &Path) -> Vec<(u64, String, f64)> {
    metrics(dir)
        .iter()
        .flat_map(|v| {
            let step = v["step"].as_u64().unwrap();
            v.as_object()
                .unwrap()
                .iter()
                .filter(|(k, _)| ["loss", "eval_loss", "grad_norm"].contains(&k.as_str()))
                .map(move |(k, x)| (step, k.clone(), x.as_f64().unwrap()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The losses, gradient norms and evaluations of the runs in `one` and `two` are the same
/// events, equal to float rounding (the order of the sums differs: two half-batch means
/// averaged, against one mean over the batch), with at least one evaluation.
fn assert_same_numbers(one: &Path, two: &Path) {
    let (a, b) = (numbers(one), numbers(two));
    assert_eq!(a.len(), b.len(), "{a:?}\n{b:?}");
    assert!(a.iter().any(|(_, k, _)| k == "eval_loss"));
    for ((sa, ka, xa), (sb, kb, xb)) in a.iter().zip(&b) {
        assert_eq!((sa, ka), (sb, kb));
        assert!(
            (xa - xb).abs() <= 1e-4 * xa.abs().max(1.0),
            "step {sa} {ka}: one process {xa}, two {xb}"
        );
    }
}

#[test]
fn two_processes_compute_what_one_does_and_resume_exactly() {
    let one = temp("one");
    let mut args = SMALL.to_vec();
    args.extend(["--steps", "8", "--out", one.to_str().unwrap()]);
    let (ok, _, err) = common::run(GPT2, None, &args);
    assert!(ok, "{err}");

    let two = temp("two");
    let mut args = SMALL.to_vec();
    args.extend(["--steps", "8", "--out", two.to_str().unwrap()]);
    let o = mpirun(2, GPT2, &args, &two, None);
    assert!(succeeded(&o), "{}\n{}", o.stdout, o.stderr);
    // Rank 0 alone reports: one summary line, one metrics file with one line per event.
    assert_eq!(o.stdout.matches("done:").count(), 1, "{}", o.stdout);
    assert!(
        o.stderr.contains("2 processes over Open MPI"),
        "{}",
        o.stderr
    );
    assert_same_numbers(&one, &two);
    let s = json(&two.join("summary.json"));
    assert_eq!(s["steps"], 8);
    assert!(s["items_per_sec"].as_f64().unwrap() > 0.0);

    // Stopped after step 4 and resumed by a new group: the metrics of the uninterrupted run.
    let resumed = temp("resumed");
    let mut args = SMALL.to_vec();
    let r = resumed.to_str().unwrap();
    args.extend(["--steps", "8", "--stop-after", "4", "--out", r]);
    let o = mpirun(2, GPT2, &args, &resumed, None);
    assert!(succeeded(&o), "{}\n{}", o.stdout, o.stderr);
    let o = mpirun(2, GPT2, &["--resume", r], &resumed, None);
    assert!(succeeded(&o), "{}\n{}", o.stdout, o.stderr);
    assert_eq!(metrics(&resumed), metrics(&two));
}

/// Llama (RoPE, grouped-query attention, SwiGLU, RMSNorm) shares GPT-2's task code, but not its
/// layers: two processes compute what one does, its sharded evaluation included.
#[test]
fn llama_in_a_group_computes_what_one_process_does() {
    let (one, two) = (temp("llama-one"), temp("llama-two"));
    let mut args = SMALL.to_vec();
    args.extend(["--steps", "4", "--out", one.to_str().unwrap()]);
    let (ok, _, err) = common::run(LLAMA, None, &args);
    assert!(ok, "{err}");
    let mut args = SMALL.to_vec();
    args.extend(["--steps", "4", "--out", two.to_str().unwrap()]);
    let o = mpirun(2, LLAMA, &args, &two, None);
    assert!(succeeded(&o), "{}\n{}", o.stdout, o.stderr);
    assert_same_numbers(&one, &two);
}

/// Small CLIP settings writing to `out`: a global batch of 8 pairs.
fn clip_args(out: &Path) -> Vec<&str> {
    let mut args = vec![
        "--steps",
        "4",
        "--batch-size",
        "8",
        "--lr",
        "2e-3",
        "--eval-every",
        "2",
        "--eval-size",
        "16",
    ];
    args.extend(["--out", out.to_str().unwrap()]);
    args
}

#[test]
fn clip_groups_contrast_the_whole_batch_and_resume_exactly() {
    // CLIP's loss compares every image with every caption of the batch: the ranks all-gather
    // their embeddings, so two processes compute the one-process loss, not two half-batch ones.
    let one = temp("clip-one");
    let (ok, _, err) = common::run(CLIP, None, &clip_args(&one));
    assert!(ok, "{err}");
    let two = temp("clip-two");
    let o = mpirun(2, CLIP, &clip_args(&two), &two, None);
    assert!(succeeded(&o), "{}\n{}", o.stdout, o.stderr);
    assert_same_numbers(&one, &two);
    assert_eq!(json(&two.join("summary.json"))["steps"], 4);
    assert!(two.join("vocab.json").exists() && two.join("similarity.png").exists());

    // Stopped after step 2 and resumed by a new group, which reads rank 0's vocabulary.
    let resumed = temp("clip-resumed");
    let mut args = clip_args(&resumed);
    args.extend(["--stop-after", "2"]);
    let o = mpirun(2, CLIP, &args, &resumed, None);
    assert!(succeeded(&o), "{}\n{}", o.stdout, o.stderr);
    let o = mpirun(
        2,
        CLIP,
        &["--resume", resumed.to_str().unwrap()],
        &resumed,
        None,
    );
    assert!(succeeded(&o), "{}\n{}", o.stdout, o.stderr);
    assert_eq!(metrics(&resumed), metrics(&two));
}

#[test]
fn mixed_precision_groups_agree_on_skipping_and_match_one_process() {
    let run = |np: usize, name: &str| {
        let dir = temp(name);
        let mut args = SMALL.to_vec();
        args.extend([
            "--steps",
            "4",
            "--dtype",
            "f16",
            "--out",
            dir.to_str().unwrap(),
        ]);
        if np == 1 {
            let (ok, _, err) = common::run(GPT2, None, &args);
            assert!(ok, "{err}");
        } else {
            let o = mpirun(np, GPT2, &args, &dir, None);
            assert!(succeeded(&o), "{}\n{}", o.stdout, o.stderr);
        }
        let s = json(&dir.join("summary.json"));
        (common::losses(&dir), s["loss_scale"].as_f64().unwrap())
    };
    let (one, scale_one) = run(1, "f16-one");
    let (two, scale_two) = run(2, "f16-two");
    assert_eq!(scale_one, scale_two);
    assert_eq!(one.len(), two.len());
    for ((s, a), (_, b)) in one.iter().zip(&two) {
        // f16 rounds half-batch activations differently from whole-batch ones.
        assert!((a - b).abs() <= 1e-2 * a.abs(), "step {s}: {a} vs {b}");
    }
}

/// Starts a long two-rank run, waits for its first steps, and does `signal` to one rank.
fn disturb_a_rank(name: &str, signal: &str, timeout: &str) -> Outcome {
    let dir = temp(name);
    let mut args = SMALL.to_vec();
    let out = dir.join("run");
    args.extend([
        "--steps",
        "100000",
        "--dist-timeout",
        timeout,
        "--out",
        out.to_str().unwrap(),
    ]);
    let started = Instant::now();
    let child = launch(2, GPT2, &args, &dir, None);
    let metrics_file = out.join("metrics.jsonl");
    let lines = || {
        std::fs::read_to_string(&metrics_file)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    while lines() < 2 {
        assert!(started.elapsed() < Duration::from_secs(300), "no steps");
        std::thread::sleep(Duration::from_millis(100));
    }
    let ranks = children(child.id());
    assert_eq!(ranks.len(), 2, "mpirun's children: {ranks:?}");
    let victim = ranks[1].to_string();
    assert!(Command::new("kill")
        .args([signal, &victim])
        .status()
        .unwrap()
        .success());
    let at = Instant::now();
    let mut o = finish(child, &dir, started, Duration::from_secs(900));
    o.took = at.elapsed();
    // Nothing of the job may outlive it (a stopped rank must be gone too).
    let _ = Command::new("kill").args(["-9", &victim]).status();
    o
}

/// The processes whose parent is `pid`, from `/proc`.
fn children(pid: u32) -> Vec<u32> {
    let mut kids: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let p: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            // `pid (comm) state ppid ...`; comm may hold spaces, so read after the last ')'.
            let ppid: u32 = stat
                .rsplit(')')
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            (ppid == pid).then_some(p)
        })
        .collect();
    kids.sort();
    kids
}

#[test]
fn a_rank_that_dies_ends_the_job() {
    let o = disturb_a_rank("killed", "-9", "600");
    assert!(
        o.status.is_some_and(|s| !s.success()),
        "the job did not end within 15 minutes of a rank's death:\n{}",
        o.stderr
    );
    assert!(o.took < Duration::from_secs(60), "took {:?}", o.took);
    assert!(o.stderr.contains("rank 1"), "{}", o.stderr);
}

#[test]
fn a_rank_that_hangs_ends_the_job_after_the_timeout() {
    // SIGSTOP: the process lives but never answers, as a rank stuck in a loop or on a
    // dead node's network would.
    let o = disturb_a_rank("stopped", "-STOP", "3");
    assert!(
        o.status.is_some_and(|s| !s.success()),
        "the job did not end within 15 minutes of a rank's hang:\n{}",
        o.stderr
    );
    assert!(o.took < Duration::from_secs(60), "took {:?}", o.took);
    assert!(
        o.stderr.contains("rank 0 of 2: waited 3 s") && o.stderr.contains("raise --dist-timeout"),
        "{}",
        o.stderr
    );
}

#[test]
fn sigusr1_to_mpirun_stops_the_group_with_a_checkpoint_that_resumes() {
    let dir = temp("usr1");
    let out = dir.join("run");
    let o = out.to_str().unwrap();
    let mut args = SMALL.to_vec();
    args.extend(["--steps", "100000", "--out", o]);
    let started = Instant::now();
    let child = launch(2, GPT2, &args, &dir, None);
    let metrics_file = out.join("metrics.jsonl");
    while std::fs::read_to_string(&metrics_file).map_or(0, |t| t.lines().count()) < 2 {
        assert!(started.elapsed() < Duration::from_secs(300), "no steps");
        std::thread::sleep(Duration::from_millis(100));
    }
    // What a user does to stop a group: Ctrl-C would make mpirun kill the ranks.
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-USR1", &pid])
        .status()
        .unwrap()
        .success());
    let stop = finish(child, &dir, started, Duration::from_secs(600));
    assert!(succeeded(&stop), "{}\n{}", stop.stdout, stop.stderr);
    let s = json(&out.join("summary.json"));
    assert_eq!(s["interrupted"], true, "{s}");
    let stopped = s["steps"].as_u64().unwrap();
    let state = json(&out.join("checkpoint").join("state.json"));
    assert_eq!(state["step"].as_u64(), Some(stopped), "{state}");
    let last = metrics(&out)
        .iter()
        .filter_map(|v| v["step"].as_u64())
        .max()
        .unwrap();
    assert_eq!(last, stopped);

    // The group resumes from that checkpoint.
    let target = (stopped + 2).to_string();
    let r = mpirun(2, GPT2, &["--resume", o, "--steps", &target], &dir, None);
    assert!(succeeded(&r), "{}\n{}", r.stdout, r.stderr);
    let steps: Vec<u64> = metrics(&out)
        .iter()
        .filter(|v| v.get("loss").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=stopped + 2).collect::<Vec<_>>());
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn a_batch_that_does_not_split_is_refused_on_every_rank() {
    let dir = temp("odd-batch");
    let out = dir.join("run");
    let mut args = SMALL.to_vec();
    let at = args.iter().position(|a| *a == "--batch-size").unwrap();
    args[at + 1] = "5";
    args.extend(["--steps", "2", "--out", out.to_str().unwrap()]);
    let o = mpirun(2, GPT2, &args, &dir, None);
    assert!(o.status.is_some_and(|s| !s.success()), "{}", o.stdout);
    assert!(
        o.stderr.contains("does not split evenly over 2 processes")
            && o.stderr.contains("multiple of 2"),
        "{}",
        o.stderr
    );
    assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
}

#[test]
fn a_launch_without_the_flag_is_refused_with_the_reason() {
    // What mpirun tells its processes, without mpirun: each would train alone.
    let dir = temp("no-flag");
    let refused = |bin: &str, args: &[&str]| -> String {
        let out = Command::new(bin)
            .args(args)
            .args(["--out", dir.to_str().unwrap()])
            .env("OMPI_COMM_WORLD_SIZE", "2")
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let mut args = SMALL.to_vec();
    args.extend(["--steps", "1"]);
    let err = refused(GPT2, &args);
    assert!(
        err.contains("one of 2 that mpirun started") && err.contains("add --distributed"),
        "{err}"
    );
    // train-digits has no data-parallel mode: it says so instead of training twice.
    let err = refused(env!("CARGO_BIN_EXE_train-digits"), &["--epochs", "1"]);
    assert!(
        err.contains("one of 2 that mpirun started") && err.contains("without mpirun"),
        "{err}"
    );
    assert!(!dir.join("summary.json").exists());
}
