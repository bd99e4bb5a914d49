"""Throughput of the next-detail transformer: CART schedule vs. VAR schedule at the same depth.

Prints, for a fixed small config (depth 8 by default, width 64*depth, Fashion-MNIST-sized 8x8
latent), training tokens/s and images/s, sampling images/s (KV cache, no guidance and with CFG),
the time share of attention vs. MLP in a training step, and the peak memory of each run (each
config runs in its own process so its peak RSS is its own). With CUDA it also times d16 in bf16
(training tokens/s, sampling images/s at batch 64). Never fails on time.

    .venv/bin/python benchmarks/bench_ar.py [--depth 8] [--batch 32] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def schedules():
    from cartlib.schedule import TokenSchedule

    return {
        "CART (order 3)": TokenSchedule.cart((1, 2, 4, 8), 3, 1),
        "VAR (order 0)": TokenSchedule.var((1, 2, 4, 8)),
    }


def build(schedule, depth, device):
    from cartlib.model import NextDetailTransformer
    from cartlib.tokenizer import ScheduleQuantizer

    model = NextDetailTransformer(schedule, 512, 16, num_classes=10, depth=depth).to(device)
    quant = ScheduleQuantizer(schedule, 512, 16).to(device).eval()
    return model, quant


def timed(fn, repeat: int, device) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def measure(name: str, depth: int, batch: int, steps: int, device: str, amp: str) -> dict:
    from cartlib.sample import generate

    class _Tok(torch.nn.Module):  # the sampler needs quantizer + decode only
        def __init__(self, q):
            super().__init__()
            self.quantizer = q

        def decode(self, f):
            return f[:, :3].sigmoid()

    sched = schedules()[name]
    model, quant = build(sched, depth, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(512, (batch, s.h, s.w), generator=g).to(device) for s in sched]
    labels = torch.randint(10, (batch,), generator=g).to(device)
    with torch.no_grad():
        inputs = quant.teacher_inputs(tokens)
    target = torch.cat([t.flatten(1) for t in tokens], 1)
    dtype = torch.bfloat16 if amp == "bf16" else torch.float32

    def train_step():
        with torch.autocast(device, dtype=dtype, enabled=amp == "bf16"):
            logits = model(labels, inputs)
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target)
        opt.zero_grad()
        loss.backward()
        opt.step()

    t_step = timed(train_step, steps, device)
    x = torch.randn(batch, sched.seq_len, model.width, device=device, requires_grad=True)
    blk = model.blocks[0]

    def part(fn):
        def run():
            with torch.autocast(device, dtype=dtype, enabled=amp == "bf16"):
                out = fn()
            out.float().sum().backward()

        return timed(run, steps, device) * depth

    t_attn = part(lambda: blk.attn(blk.norm1(x), model.mask))
    t_mlp = part(lambda: blk.mlp(blk.norm2(x)))
    tok = _Tok(quant)
    sample_batch = 64 if device == "cuda" else batch

    def sample(cfg):
        with torch.autocast(device, dtype=dtype, enabled=amp == "bf16"):
            generate(model, tok, torch.arange(sample_batch) % 10, cfg=cfg, seed=0)

    t_s = timed(lambda: sample(0.0), steps, device)
    t_cfg = timed(lambda: sample(1.5), steps, device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    return {
        "schedule": name,
        "depth": depth,
        "device": device,
        "amp": amp,
        "batch": batch,
        "params_M": model.num_params() / 1e6,
        "seq_len": sched.seq_len,
        "steps_M": sched.n_steps,
        "train_tokens_per_s": batch * sched.seq_len / t_step,
        "train_images_per_s": batch / t_step,
        "sample_images_per_s": sample_batch / t_s,
        "sample_images_per_s_cfg": sample_batch / t_cfg,
        "attn_share": t_attn / (t_attn + t_mlp),
        "peak_mem_MiB": peak,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # name of one config (child process)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="no")
    args = ap.parse_args()
    if args.one:
        res = measure(args.one, args.depth, args.batch, args.steps, args.device, args.amp)
        print(json.dumps(res))
        return
    runs = [(n, args.depth, "cpu", amp) for n in schedules() for amp in ("no", "bf16")]
    if torch.cuda.is_available():
        runs += [(n, 16, "cuda", "bf16") for n in schedules()]
    rows = []
    for name, depth, device, amp in runs:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            name,
            "--depth",
            str(depth),
            "--batch",
            str(args.batch),
            "--steps",
            str(args.steps),
            "--device",
            device,
            "--amp",
            amp,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(
        "| schedule | device | amp | depth | params | tokens | train tok/s | train img/s | "
        "sample img/s | sample img/s (CFG) | attention share | peak MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['schedule']} | {r['device']} | {r['amp']} | {r['depth']} | "
            f"{r['params_M']:.1f}M | {r['seq_len']} | {r['train_tokens_per_s']:,.0f} | "
            f"{r['train_images_per_s']:.1f} | {r['sample_images_per_s']:.1f} | "
            f"{r['sample_images_per_s_cfg']:.1f} | {r['attn_share']:.0%} | "
            f"{r['peak_mem_MiB']:.0f} |"
        )
    cart = [r for r in rows if r["schedule"].startswith("CART") and r["device"] == "cpu"]
    var = [r for r in rows if r["schedule"].startswith("VAR") and r["device"] == "cpu"]
    for c, v in zip(cart, var):
        ratio = c["train_images_per_s"] / v["train_images_per_s"]
        print(
            f"{c['amp']}: CART/VAR training images/s ratio {ratio:.2f}, "
            f"sampling {c['sample_images_per_s'] / v['sample_images_per_s']:.2f} "
            f"(sequence {c['seq_len']} vs {v['seq_len']} tokens)"
        )


if __name__ == "__main__":
    main()
