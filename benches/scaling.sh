#!/usr/bin/env bash
# Data-parallel scaling on this machine: 1 versus 2 processes of one thread each, ours
# (`mpirun -np N train-* --distributed`) beside PyTorch's (DistributedDataParallel over gloo,
# `pytorch/bench.py ddp`), for GPT-2 tiny and ResNet tiny. Weak scaling, as the original
# framework's figures are: every process keeps the preset's batch (GPT-2 16×128 tokens,
# ResNet 64 images), so N processes train on N times the examples per step; efficiency is
# the throughput of N processes over N times that of one.
#
#   bash benches/scaling.sh [STEPS] [PYTHON]    # writes benches/scaling.json
#
# Needs Open MPI (tools/install-openmpi.sh), Fashion-MNIST (python3 tools/fetch_data.py
# fashion-mnist) and, for PyTorch's side, a Python with torch and transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-30}
python=${2:-python3}
cargo build --release -q -p neural-arch-examples --features mpi --bin train-gpt2 --bin train-resnet
# MIMALLOC_PURGE_DELAY as `cargo run` sets it (.cargo/config.toml; see the README's Trainers).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 RAYON_NUM_THREADS=1 MIMALLOC_PURGE_DELAY=-1
tmp=$(mktemp -d)
rows=()
for model in gpt2 resnet; do
    per=16
    [ "$model" = resnet ] && per=64
    for world in 1 2; do
        out="$tmp/$model-$world"
        mpirun --oversubscribe --bind-to none -np "$world" "target/release/train-$model" \
            --distributed --no-progress --steps "$steps" --eval-every 0 \
            --batch-size $((per * world)) --out "$out" >/dev/null
        ours=$("$python" -c "import json,sys; print(json.load(open(sys.argv[1]))['items_per_sec'])" "$out/summary.json")
        torch=$("$python" benches/pytorch/bench.py ddp "$model" --world "$world" --steps "$steps" |
            "$python" -c "import json,sys; print(json.loads(sys.stdin.read())['items_per_sec'])")
        echo "$model, $world process(es): ours $ours, PyTorch $torch items/s"
        rows+=("{\"model\": \"$model\", \"processes\": $world, \"ours\": $ours, \"pytorch\": $torch}")
    done
done
(IFS=,; echo "[${rows[*]}]") | "$python" -c "
import json, sys
rows = json.load(sys.stdin)
by = {(r['model'], r['processes']): r for r in rows}
for r in rows:
    one = by[(r['model'], 1)]
    r['ours_efficiency'] = r['ours'] / (r['processes'] * one['ours'])
    r['pytorch_efficiency'] = r['pytorch'] / (r['processes'] * one['pytorch'])
    r['ours_over_pytorch'] = r['ours'] / r['pytorch']
json.dump(rows, open('benches/scaling.json', 'w'), indent=1)
for r in rows:
    print(f\"{r['model']:7} {r['processes']} proc: ours {r['ours']:9.0f}/s ({r['ours_efficiency']:.1%}), \"
          f\"PyTorch {r['pytorch']:9.0f}/s ({r['pytorch_efficiency']:.1%}), ours/PyTorch {r['ours_over_pytorch']:.2f}\")
"
rm -rf "$tmp"
