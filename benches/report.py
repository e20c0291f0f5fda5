#!/usr/bin/env python3
"""Runs neural-arch's benches beside their PyTorch eager counterparts on this machine, at the
same thread counts, and writes `benches/report.md` and `benches/report.png`.

    python3 benches/report.py                  # everything, at 1 and 2 threads
    python3 benches/report.py --threads 2 --skip-runs

What it runs, for each thread count N (`RAYON_NUM_THREADS=N` for ours,
`torch.set_num_threads(N)` for PyTorch):
1. `cargo bench -p neural-arch-benches` (criterion; the operation table and one training step
   of each tiny preset), saved as the baseline `threadsN`;
2. `benches/pytorch/bench.py micro`: the same rows in PyTorch;
3. unless `--skip-runs`, at the `--run-threads` counts (the largest by default): each trainer
   binary for `--steps` steps, and the same model trained by `bench.py run` in a fresh
   process: throughput, and memory from `/proc` (peak, and at the start of training).

PyTorch comes from `$TORCH_PYTHON` when set (a Python with torch, torchvision, transformers,
matplotlib), else from a virtual environment this script creates in
`~/.cache/neural-arch/torch-venv` (about 3 GB from PyPI). The data sets the trainers need are
fetched by `tools/fetch_data.py`.

Ratios are PyTorch's time over ours (above 1: we are faster), so higher is better for us in
every column. Timings vary with the machine's load: run it on an otherwise idle machine.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHES = ROOT / "benches"
CRITERION = ROOT / "target" / "criterion"
PRESETS = ["gpt2", "llama", "bert", "vit", "resnet", "clip"]
OPS = ["matmul", "conv2d", "attention", "layer_norm", "gelu", "softmax", "embedding"]
OP_SHAPES = {
    "matmul": "[2048, 128] × [128, 512] (our `linear`, through faer)",
    "conv2d": "[64, 16, 32, 32], 16→16, 3×3, pad 1",
    "attention": "causal, [16, 128, 128], 4 heads (qkv + SDPA + out)",
    "layer_norm": "[16, 128, 128]",
    "gelu": "tanh, [16, 128, 512]",
    "softmax": "[16, 4, 128, 128]",
    "embedding": "8000 × 128, [16, 128] ids",
}
# Flags that keep each trainer's evaluation and sampling small: the runs measure training.
TRAINER_FLAGS = {
    "gpt2": ["--eval-tokens", "2048", "--sample-tokens", "4"],
    "llama": ["--eval-tokens", "2048", "--sample-tokens", "4"],
    "bert": ["--eval-examples", "64"],
    "vit": ["--eval-limit", "256"],
    "resnet": ["--eval-limit", "256"],
    "clip": ["--eval-size", "96"],
}
# Goals of the performance issue.
STEP_GOAL, OP_GOAL, MEMORY_GOAL = 1.1, 1.0, 0.5


def log(msg):
    print(f"[report] {msg}", file=sys.stderr, flush=True)


def torch_python():
    """A Python with torch, torchvision, transformers and matplotlib."""
    given = os.environ.get("TORCH_PYTHON")
    if given:
        return given
    venv = Path.home() / ".cache" / "neural-arch" / "torch-venv"
    py = venv / "bin" / "python"
    probe = [str(py), "-c", "import torch, torchvision, transformers, matplotlib"]
    if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return str(py)
    log(f"creating {venv} with torch, torchvision, transformers, matplotlib (about 3 GB)")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", "torch", "torchvision", "transformers",
         "matplotlib"],
        check=True,
    )
    return str(py)


def env_with(threads):
    env = dict(os.environ)
    env["RAYON_NUM_THREADS"] = str(threads)
    env["OMP_NUM_THREADS"] = str(threads)
    # What `.cargo/config.toml` gives `cargo run`: mimalloc keeps freed memory.
    env["MIMALLOC_PURGE_DELAY"] = "-1"
    return env


def cargo_bench(threads):
    log(f"cargo bench at {threads} thread(s)")
    subprocess.run(
        ["cargo", "bench", "-p", "neural-arch-benches", "--", "--noplot",
         "--save-baseline", f"threads{threads}"],
        cwd=ROOT, env=env_with(threads), check=True,
    )


def criterion_median(bench_id, threads):
    """The median time in seconds of a criterion benchmark's saved baseline."""
    path = CRITERION / bench_id / f"threads{threads}" / "estimates.json"
    with open(path) as f:
        return json.load(f)["median"]["point_estimate"] * 1e-9


def torch_micro(py, threads, out, flops):
    log(f"PyTorch at {threads} thread(s)")
    cmd = [py, str(BENCHES / "pytorch" / "bench.py"), "micro", "--threads", str(threads),
           "--out", str(out)]
    if flops:
        cmd.append("--flops")
    subprocess.run(cmd, env=env_with(threads), check=True)
    with open(out) as f:
        return json.load(f)


def wait_rss(cmd, env, cwd=None):
    """Runs `cmd` and returns its stdout and peak resident bytes (from `wait4`)."""
    p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with status {p.returncode}")
    return out, usage.ru_maxrss * 1024


def whole_runs(py, threads, steps):
    """Each trainer and its PyTorch counterpart for `steps` steps."""
    rows = {}
    for name in PRESETS:
        out = Path(tempfile.mkdtemp(prefix=f"na-bench-{name}-"))
        cmd = [str(ROOT / "target" / "release" / f"train-{name}"), "--steps", str(steps),
               "--out", str(out), "--no-progress", "--eval-every", "0",
               "--checkpoint-every", "0", *TRAINER_FLAGS[name]]
        log(f"train-{name} at {threads} thread(s), {steps} steps")
        wait_rss(cmd, env_with(threads))
        with open(out / "summary.json") as f:
            ours = json.load(f)
        shutil.rmtree(out, ignore_errors=True)
        log(f"PyTorch {name} at {threads} thread(s), {steps} steps")
        text, _ = wait_rss(
            [py, str(BENCHES / "pytorch" / "bench.py"), "run", name, "--threads",
             str(threads), "--steps", str(steps)],
            env_with(threads),
        )
        theirs = json.loads(text.strip().splitlines()[-1])
        rows[name] = {"ours": ours, "torch": theirs}
    return rows


def ratio(theirs, ours):
    return theirs / ours if ours > 0 else float("nan")


def mib(b):
    return b / 2**20


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, Linux {platform.release()}"


def write_report(results, runs, args, torch_version):
    lines = [
        "# neural-arch against PyTorch eager",
        "",
        f"Machine: {machine()}. PyTorch {torch_version}. Written by `python3 benches/report.py"
        f" {' '.join(sys.argv[1:])}`.".rstrip() + " Ratio = PyTorch's time over ours"
        " (throughput: ours over PyTorch's; memory: PyTorch's peak over ours): above 1 we are"
        " faster or smaller. Goals: every training step ≥ 1.1, every operation ≥ 1.0, peak"
        " memory ≤ half of PyTorch's (ratio ≥ 2).",
        "",
    ]
    for threads, (ours, torch) in sorted(results.items()):
        lines += [
            f"## Operations, {threads} thread{'s' if threads > 1 else ''} (median ms)",
            "",
            "| operation | shape | pass | ours | PyTorch | ratio |",
            "| --- | --- | --- | ---: | ---: | ---: |",
        ]
        for op in OPS:
            for pas in ["forward", "forward_backward"]:
                key = f"{op}/{pas}"
                o, t = ours["ops"][key], torch["ops"][key]
                mark = "" if ratio(t, o) >= OP_GOAL else " ✗"
                lines.append(
                    f"| {op} | {OP_SHAPES[op]} | {pas.replace('_', ' + ')} | {o * 1e3:.3f} |"
                    f" {t * 1e3:.3f} | {ratio(t, o):.2f}{mark} |"
                )
        gemm = torch.get("gemm_flops_per_s")
        lines += [
            "",
            f"## Training steps, {threads} thread{'s' if threads > 1 else ''}",
            "",
            "One step of each tiny preset at the trainers' batch size: forward, loss, backward,"
            " gradient clipping, AdamW. MFU: the step's model FLOPs (counted by PyTorch's"
            " `FlopCounterMode`) per second, over PyTorch's f32 GEMM rate on 2048³ at this"
            f" thread count ({gemm / 1e9:.1f} GFLOP/s)." if gemm else "",
            "",
            "| preset | batch | ours ms | PyTorch ms | ratio | ours MFU | PyTorch MFU |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        # Counted once, by whichever PyTorch run was asked to.
        flops = next((t["flops"] for _, t in results.values() if t.get("flops")), {})
        for name in PRESETS:
            o, t = ours["train_step"][name], torch["train_step"][name]["seconds"]
            items, unit = torch["train_step"][name]["items"], torch["train_step"][name]["unit"]
            f = flops.get(name)
            mfu = (lambda s: f"{100 * f / s / gemm:.1f} %") if f and gemm else (lambda s: "-")
            mark = "" if ratio(t, o) >= STEP_GOAL else " ✗"
            lines.append(
                f"| {name} | {items} {unit} | {o * 1e3:.1f} | {t * 1e3:.1f} |"
                f" {ratio(t, o):.2f}{mark} | {mfu(o)} | {mfu(t)} |"
            )
        lines.append("")
    for threads, rows in sorted(runs.items()):
        lines += [
            f"## Whole training runs, {threads} thread{'s' if threads > 1 else ''}, {args.steps}"
            " steps",
            "",
            "Our trainer binaries (data loading, the final evaluation on a small set, a"
            " checkpoint) against the same model trained by `bench.py run` on synthetic batches"
            " of the same shape. Throughput over the training steps; memory from"
            " `/proc/self/status`.",
            "",
            "| trainer | ours /s | PyTorch /s | ratio | ours peak MiB | PyTorch peak MiB |"
            " memory ratio |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name in PRESETS:
            o, t = rows[name]["ours"], rows[name]["torch"]
            r = ratio(o["items_per_sec"], t["items_per_sec"])
            m = ratio(t["peak_rss_bytes"], o["peak_rss_bytes"])
            lines.append(
                f"| train-{name} | {o['items_per_sec']:.0f} {o['unit']} |"
                f" {t['items_per_sec']:.0f} | {r:.2f}{'' if r >= STEP_GOAL else ' ✗'} |"
                f" {mib(o['peak_rss_bytes']):.0f} | {mib(t['peak_rss_bytes']):.0f} |"
                f" {m:.2f}{'' if m >= 1 / MEMORY_GOAL else ' ✗'} |"
            )
        lines += [
            "",
            f"### Memory breakdown, {threads} thread{'s' if threads > 1 else ''} (MiB)",
            "",
            "Parameters, gradients and AdamW's two moments are 4 bytes per parameter each."
            " Runtime and data: resident memory when training starts, less the parameters"
            " (ours: the binary, the data set and tokenizer; PyTorch: the interpreter and its"
            " libraries, synthetic batches). Activations and workspace: the peak less"
            " everything else (the tape's saved tensors, temporaries, allocator slack).",
            "",
            "| trainer | side | parameters | gradients | optimizer | activations + workspace |"
            " runtime + data | peak |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name in PRESETS:
            for side, key in [("ours", "ours"), ("PyTorch", "torch")]:
                s = rows[name][key]
                p = 4 * s["params"]
                start = s.get("rss_at_start_bytes", 0)
                peak = s["peak_rss_bytes"]
                runtime = start - p
                act = peak - start - 3 * p
                lines.append(
                    f"| train-{name} | {side} | {mib(p):.1f} | {mib(p):.1f} | {mib(2 * p):.1f} |"
                    f" {mib(act):.0f} | {mib(runtime):.0f} | {mib(peak):.0f} |"
                )
        lines.append("")
    (BENCHES / "report.md").write_text("\n".join(lines))
    log(f"wrote {BENCHES / 'report.md'}")


def write_chart(py, results, runs):
    """A bar chart of every ratio, one panel per table, drawn by matplotlib in the torch
    Python."""
    data = {"ops": {}, "steps": {}, "runs": {}}
    for threads, (ours, torch) in sorted(results.items()):
        data["ops"][threads] = {
            k: ratio(torch["ops"][k], ours["ops"][k]) for k in ours["ops"]
        }
        data["steps"][threads] = {
            n: ratio(torch["train_step"][n]["seconds"], ours["train_step"][n]) for n in PRESETS
        }
    for threads, rows in sorted(runs.items()):
        data["runs"][threads] = {
            n: ratio(rows[n]["ours"]["items_per_sec"], rows[n]["torch"]["items_per_sec"])
            for n in PRESETS
        }
    script = r"""
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
data, out = json.loads(sys.argv[1]), sys.argv[2]
panels = [(k, v) for k, v in [("operations (PyTorch time / ours)", data["ops"]),
          ("training step (PyTorch time / ours)", data["steps"]),
          ("whole run (our throughput / PyTorch's)", data["runs"])] if v]
fig, axes = plt.subplots(len(panels), 1, figsize=(11, 4 * len(panels)))
axes = [axes] if len(panels) == 1 else axes
for ax, (title, by_threads) in zip(axes, panels):
    threads = sorted(by_threads, key=int)
    names = list(by_threads[threads[0]])
    width = 0.8 / len(threads)
    for i, t in enumerate(threads):
        xs = [j + i * width for j in range(len(names))]
        ax.bar(xs, [by_threads[t][n] for n in names], width, label=f"{t} thread(s)")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + width * (len(threads) - 1) / 2 for j in range(len(names))])
    ax.set_xticklabels([n.replace("/forward_backward", " f+b").replace("/forward", " f")
                        for n in names], rotation=30, ha="right", fontsize=8)
    ax.set_title(title)
    ax.set_ylabel("ratio (>1: ours faster)")
    ax.legend()
fig.tight_layout()
fig.savefig(out, dpi=110)
"""
    subprocess.run([py, "-c", script, json.dumps(data), str(BENCHES / "report.png")],
                   check=True)
    log(f"wrote {BENCHES / 'report.png'}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    p.add_argument("--steps", type=int, default=20, help="steps of each whole run")
    p.add_argument("--run-threads", default=None,
                   help="thread counts of the whole runs (default: the largest of --threads)")
    p.add_argument("--skip-runs", action="store_true", help="only the criterion rows")
    p.add_argument("--skip-cargo-bench", action="store_true",
                   help="reuse the criterion baselines already saved")
    args = p.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    run_threads = ([int(t) for t in args.run_threads.split(",")] if args.run_threads
                   else [max(threads)])
    py = torch_python()
    torch_version = subprocess.run(
        [py, "-c", "import torch; print(torch.__version__)"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    if not args.skip_runs:
        subprocess.run([sys.executable, str(ROOT / "tools" / "fetch_data.py"), "brown",
                        "fashion-mnist"], check=True)
        log("building the trainers")
        subprocess.run(["cargo", "build", "--release", "-p", "neural-arch-examples",
                        "--bins"], cwd=ROOT, check=True)
    results, runs = {}, {}
    scratch = Path(tempfile.mkdtemp(prefix="na-bench-"))
    for i, n in enumerate(threads):
        if not args.skip_cargo_bench:
            cargo_bench(n)
        ours = {
            # criterion names the directory of `matmul/forward` `matmul_forward`.
            "ops": {f"{op}/{pas}": criterion_median(f"{op}_{pas}", n)
                    for op in OPS for pas in ["forward", "forward_backward"]},
            "train_step": {name: criterion_median(f"train_step/{name}", n) for name in PRESETS},
        }
        # FLOPs do not depend on the threads: counted once, with the last thread count.
        torch = torch_micro(py, n, scratch / f"torch-{n}.json", flops=i == len(threads) - 1)
        results[n] = (ours, torch)
        if not args.skip_runs and n in run_threads:
            runs[n] = whole_runs(py, n, args.steps)
    (BENCHES / "report.json").write_text(
        json.dumps({"results": results, "runs": runs}, indent=1, default=str)
    )
    write_report(results, runs, args, torch_version)
    write_chart(py, results, runs)


if __name__ == "__main__":
    main()
