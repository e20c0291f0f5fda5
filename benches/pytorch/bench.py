"""PyTorch eager counterparts of neural-arch's benches, with the same shapes, configs and
optimizer: the operation table (`benches/ops.rs`), one training step of each tiny preset
(`benches/training_step.rs`, `src/lib.rs`), and whole training runs of the same models.

    python bench.py micro --threads 1 --out torch-1.json   # ops and training steps
    python bench.py run gpt2 --threads 2 --steps 20        # a whole run; prints one JSON line
    python bench.py run gpt2 --threads 2 --dtype bf16      # the same under torch.autocast
    python bench.py ddp gpt2 --world 2 --steps 20          # DistributedDataParallel (gloo)

Each row is timed as criterion times ours: warm up, then many runs; we keep the median. The
model FLOPs of each step are counted by `torch.utils.flop_counter` on eager attention (the
same arithmetic as the SDPA kernel the timed models use), and the machine's f32 GEMM rate
is PyTorch's own on a 2048^3 product.

Dropout as in our presets: BERT 0.1 on hidden states (none on attention probabilities), none
elsewhere. Attention is PyTorch's default (`sdpa`): the fastest eager path a user gets.
"""

import argparse
import json
import resource
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 8000
LM_BATCH = (16, 128)
BERT_BATCH = (32, 64)
BERT_MASKED = 0.15
IMAGE_BATCH = 64
CLIP_BATCH = (96, 16)
CLIP_EOS = 7999

# Trainable parameters of our presets (`model-summary`): the counterparts must match.
PARAMS = {
    "gpt2": 1_850_112,
    "llama": 1_942_368,
    "bert": 1_858_752,
    "vit": 809_354,
    "resnet": 78_042,
    "clip": 2_265_857,
}


def rss_bytes():
    """Resident memory now (VmRSS), as our trainers read it."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def median_seconds(fn, warmup_s=0.5, measure_s=2.0, min_runs=10):
    """The median time of `fn()` after `warmup_s` of runs, over at least `min_runs` runs
    and `measure_s` seconds."""
    start = time.perf_counter()
    while time.perf_counter() - start < warmup_s:
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < measure_s:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# The operation table (benches/ops.rs)
# ---------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """GPT-2's attention (nanoGPT's module): qkv projection, causal SDPA, output projection."""

    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.h, d // self.h).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, d))


def op_rows():
    """(name, forward closure, forward+backward closure) for every row of the table."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape, grad=True):
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    rows = []

    a, w = randn(2048, 128), randn(128, 512)

    def mm_fb():
        a.grad = w.grad = None
        (a @ w).sum().backward()

    rows.append(("matmul", lambda: a.detach() @ w.detach(), mm_fb))

    def layer(name, module, x):
        def fwd():
            with torch.no_grad():
                module(x)

        def fwd_bwd():
            module.zero_grad(set_to_none=False)
            if x.is_floating_point():
                x.grad = None
            module(x).sum().backward()

        rows.append((name, fwd, fwd_bwd))

    layer("conv2d", nn.Conv2d(16, 16, 3, padding=1, bias=False), randn(64, 16, 32, 32))
    layer("attention", CausalSelfAttention(128, 4), randn(16, 128, 128))
    layer("layer_norm", nn.LayerNorm(128), randn(16, 128, 128))
    layer("gelu", nn.GELU(approximate="tanh"), randn(16, 128, 512))
    layer("softmax", nn.Softmax(dim=-1), randn(16, 4, 128, 128))
    ids = torch.randint(0, VOCAB, (16, 128), generator=g)
    layer("embedding", nn.Embedding(VOCAB, 128), ids)
    return rows


# ---------------------------------------------------------------------------------------------
# The six tiny presets (models/src/*.rs), with the trainers' batch and optimizer
# ---------------------------------------------------------------------------------------------


class ResNetCifar(nn.Module):
    """`ResNetTiny`: a 3x3 stem without max-pool, one torchvision basic block per stage,
    widths 16/32/64, global average pool, 10 classes."""

    def __init__(self):
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        def block(cin, cout, stride):
            down = None
            if stride != 1 or cin != cout:
                down = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
                )
            return BasicBlock(cin, cout, stride=stride, downsample=down)

        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = block(16, 16, 1)
        self.layer2 = block(16, 32, 2)
        self.layer3 = block(32, 64, 2)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


def build(name, attn="sdpa", wrap=None):
    """(model, lr, weight decay, step closure factory, items per step, unit) for a preset.
    The closure computes the loss of the fixed batch; `wrap` (DistributedDataParallel)
    wraps the model the closure calls."""
    import transformers as tf

    g = torch.Generator().manual_seed(0)
    if name in ("gpt2", "llama"):
        b, t = LM_BATCH
        if name == "gpt2":
            cfg = tf.GPT2Config(
                vocab_size=VOCAB, n_positions=256, n_embd=128, n_layer=4, n_head=4,
                n_inner=512, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                bos_token_id=0, eos_token_id=0, attn_implementation=attn,
            )
            model = tf.GPT2LMHeadModel(cfg)
        else:
            cfg = tf.LlamaConfig(
                vocab_size=VOCAB, hidden_size=96, intermediate_size=256, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                tie_word_embeddings=False, attn_implementation=attn,
            )
            model = tf.LlamaForCausalLM(cfg)
        model = wrap(model) if wrap else model
        x = torch.randint(0, VOCAB, (b, t), generator=g)
        y = torch.randint(0, VOCAB, (b * t,), generator=g)

        def loss():
            return F.cross_entropy(model(input_ids=x).logits.view(-1, VOCAB), y)

        return model, 1e-3, 0.1, loss, b * t, "tokens"
    if name == "bert":
        b, t = BERT_BATCH
        cfg = tf.BertConfig(
            vocab_size=VOCAB, max_position_embeddings=128, type_vocab_size=2, hidden_size=128,
            num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
            hidden_act="gelu", layer_norm_eps=1e-12, hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.0, attn_implementation=attn,
        )
        model = tf.BertForMaskedLM(cfg)
        x = torch.randint(0, VOCAB, (b, t), generator=g)
        at = (torch.rand(b * t, generator=g) < BERT_MASKED).nonzero().squeeze(1)
        y = torch.randint(0, VOCAB, (at.numel(),), generator=g)
        mask, types = torch.ones(b, t, dtype=torch.long), torch.zeros(b, t, dtype=torch.long)

        def loss():
            # The head at the masked positions only, as train-bert does.
            h = model.bert(input_ids=x, attention_mask=mask, token_type_ids=types)[0]
            logits = model.cls(h.reshape(b * t, -1)[at])
            return F.cross_entropy(logits, y)

        return model, 1e-3, 0.01, loss, b * t, "tokens"
    if name in ("vit", "resnet"):
        b = IMAGE_BATCH
        if name == "vit":
            cfg = tf.ViTConfig(
                image_size=32, patch_size=4, num_channels=3, hidden_size=128,
                num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                hidden_act="gelu", layer_norm_eps=1e-12, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, num_labels=10, attn_implementation=attn,
            )
            model = tf.ViTForImageClassification(cfg)
            model = wrap(model) if wrap else model
            lr = 1e-3

            def forward(x):
                return model(pixel_values=x).logits
        else:
            model = ResNetCifar()
            model = wrap(model) if wrap else model
            lr = 2e-3
            forward = model
        x = torch.randn(b, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (b,), generator=g)

        def loss():
            return F.cross_entropy(forward(x), y)

        return model, lr, 0.05, loss, b, "images"
    if name == "clip":
        b, t = CLIP_BATCH
        cfg = tf.CLIPConfig(
            text_config=dict(
                vocab_size=VOCAB, hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                num_attention_heads=4, max_position_embeddings=32, hidden_act="quick_gelu",
                layer_norm_eps=1e-5, attention_dropout=0.0, bos_token_id=0, pad_token_id=1,
                eos_token_id=CLIP_EOS,
            ),
            vision_config=dict(
                hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                num_attention_heads=4, image_size=32, patch_size=4, num_channels=3,
                hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0,
            ),
            projection_dim=128,
        )
        cfg._attn_implementation = attn
        model = tf.CLIPModel(cfg)
        ids = torch.randint(0, CLIP_EOS, (b, t), generator=g)
        ids[:, -1] = CLIP_EOS
        px = torch.randn(b, 3, 32, 32, generator=g)

        def loss():
            return model(input_ids=ids, pixel_values=px, return_loss=True).loss

        return model, 5e-4, 0.1, loss, b, "pairs"
    raise SystemExit(f"unknown preset {name!r}; choose one of {', '.join(PARAMS)}")


def trainer(name, attn="sdpa", dtype="f32"):
    """A step closure as the trainers run it: zero, forward, loss, backward, clip 1, AdamW.
    With `dtype` f16 or bf16, mixed precision as PyTorch documents it: the forward pass and
    the loss under `torch.autocast`, f32 weights, and for f16 a `GradScaler` (unscaled before
    the clip)."""
    model, lr, wd, loss_fn, items, unit = build(name, attn)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n != PARAMS[name]:
        sys.exit(f"{name}: {n} parameters here, {PARAMS[name]} in our preset; fix the config")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd, eps=1e-8)
    half = {"f16": torch.float16, "bf16": torch.bfloat16}.get(dtype)
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == "f16")

    def step():
        opt.zero_grad(set_to_none=False)
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    def mixed_step():
        opt.zero_grad(set_to_none=False)
        with torch.autocast("cpu", dtype=half):
            loss = loss_fn()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        return loss.item()

    if half is not None:
        return model, mixed_step, items, unit, n

    return model, step, items, unit, n


def step_flops(name):
    """FLOPs of one forward + backward of the preset (the optimizer's are negligible)."""
    from torch.utils.flop_counter import FlopCounterMode

    _, step, *_ = trainer(name, attn="eager")
    step()  # lazily allocated state outside the count
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def gemm_rate():
    """PyTorch's f32 GEMM rate in FLOP/s on 2048 x 2048 x 2048."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / median_seconds(lambda: a @ b, warmup_s=1.0, measure_s=3.0)


def micro(args):
    torch.set_num_threads(args.threads)
    out = {"threads": args.threads, "torch": torch.__version__, "ops": {}, "train_step": {}}
    for name, fwd, fwd_bwd in op_rows():
        out["ops"][f"{name}/forward"] = median_seconds(fwd)
        out["ops"][f"{name}/forward_backward"] = median_seconds(fwd_bwd)
        print(f"  torch {args.threads}t {name}: {out['ops'][name + '/forward'] * 1e3:.3f} ms, "
              f"{out['ops'][name + '/forward_backward'] * 1e3:.3f} ms", file=sys.stderr)
    for name in PARAMS:
        _, step, items, unit, n = trainer(name)
        t = median_seconds(step, warmup_s=1.0, measure_s=8.0, min_runs=10)
        out["train_step"][name] = {"seconds": t, "items": items, "unit": unit, "params": n}
        print(f"  torch {args.threads}t step {name}: {t * 1e3:.1f} ms", file=sys.stderr)
    out["gemm_flops_per_s"] = gemm_rate()
    if args.flops:
        out["flops"] = {name: step_flops(name) for name in PARAMS}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


def run(args):
    """A whole run of `steps` steps in a fresh process: throughput and memory."""
    torch.set_num_threads(args.threads)
    base = rss_bytes()
    torch.manual_seed(0)
    model, step, items, unit, n = trainer(args.preset, dtype=args.dtype)
    start_rss = rss_bytes()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    dt = time.perf_counter() - t0
    print(json.dumps({
        "preset": args.preset, "threads": args.threads, "steps": args.steps, "dtype": args.dtype,
        "items_per_sec": items * args.steps / dt, "unit": unit, "params": n,
        "runtime_rss_bytes": base, "rss_at_start_bytes": start_rss,
        "peak_rss_bytes": peak_rss_bytes(),
    }))


def ddp_rank(rank, args, port, out):
    """One rank of `ddp`: the preset's batch on each rank; DistributedDataParallel over gloo
    (bucketed all-reduces that overlap the backward pass) when there are several."""
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.world)
    torch.manual_seed(rank)
    wrap = DistributedDataParallel if args.world > 1 else None
    model, lr, wd, loss_fn, items, unit = build(args.preset, wrap=wrap)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd, eps=1e-8)

    def step():
        opt.zero_grad(set_to_none=False)
        loss_fn().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(2):
        step()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    dist.barrier()
    dt = time.perf_counter() - t0
    if rank == 0:
        out.put({"preset": args.preset, "world": args.world, "steps": args.steps,
                 "items_per_sec": items * args.world * args.steps / dt, "unit": unit})
    dist.destroy_process_group()


def ddp(args):
    """`world` processes of one thread each, every one with the preset's batch (weak
    scaling); prints the global throughput as one JSON line."""
    import random

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = random.randint(20000, 60000)
    procs = [ctx.Process(target=ddp_rank, args=(r, args, port, out)) for r in range(args.world)]
    for p in procs:
        p.start()
    result = out.get()
    for p in procs:
        p.join()
    print(json.dumps(result))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("micro", help="the operation table and one step of each preset")
    m.add_argument("--threads", type=int, required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--flops", action="store_true", help="also count the FLOPs of each step")
    r = sub.add_parser("run", help="a whole training run of one preset")
    r.add_argument("preset", choices=list(PARAMS))
    r.add_argument("--threads", type=int, required=True)
    r.add_argument("--steps", type=int, default=20)
    r.add_argument("--dtype", choices=["f32", "f16", "bf16"], default="f32",
                   help="f16 or bf16: mixed precision under torch.autocast")
    d = sub.add_parser("ddp", help="data-parallel training across processes, one thread each")
    d.add_argument("preset", choices=list(PARAMS))
    d.add_argument("--world", type=int, required=True)
    d.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    {"micro": micro, "run": run, "ddp": ddp}[args.cmd](args)


if __name__ == "__main__":
    main()
