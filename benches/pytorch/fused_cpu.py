"""PyTorch counterpart of `cargo run --release -p neural-arch --example fused_cpu_bench`:
LayerNorm(768) on [8, 128, 768], softmax(dim=-1) on [8, 12, 128, 128], exact GELU on
[8, 128, 3072]; f32, forward (no_grad) and forward + backward of sum(y * g); medians of 15.

Run with the same thread count as RAYON_NUM_THREADS on the Rust side:
    /opt/torch-venv/bin/python benches/pytorch/fused_cpu.py 1
    /opt/torch-venv/bin/python benches/pytorch/fused_cpu.py 2
"""
import statistics
import sys
import time

import torch

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
torch.set_num_threads(threads)
torch.manual_seed(0)
REPS = 15


def median_ms(f):
    f()
    times = []
    for _ in range(REPS):
        s = time.perf_counter()
        f()
        times.append((time.perf_counter() - s) * 1e3)
    return statistics.median(times)


def bench(name, layer, shape):
    x = torch.randn(*shape)
    g = torch.randn(*shape)

    def fwd():
        with torch.no_grad():
            layer(x)

    def fwd_bwd():
        xt = x.clone().requires_grad_(True)
        (layer(xt) * g).sum().backward()

    def loss_alone():
        xt = x.clone().requires_grad_(True)
        (xt * g).sum().backward()

    print(f"{name:<28} forward {median_ms(fwd):7.2f} ms | forward+backward {median_ms(fwd_bwd):7.2f} ms"
          f" | the loss alone {median_ms(loss_alone):6.2f} ms")


print(f"torch {torch.__version__}, {threads} thread(s), f32, median of {REPS}")
bench("LayerNorm(768) [8,128,768]", torch.nn.LayerNorm(768), (8, 128, 768))
bench("softmax [8,12,128,128]", lambda t: torch.softmax(t, dim=-1), (8, 12, 128, 128))
bench("GELU [8,128,3072]", torch.nn.GELU(), (8, 128, 3072))
