"""Throughput of the next-detail transformer: CART schedule vs. VAR schedule at the same depth.

Prints, for a fixed small config (depth 8 by default, width 64*depth, Fashion-MNIST-sized 8x8
latent), training tokens/s and images/s, sampling images/s (KV cache, no guidance and with CFG),
the time share of attention vs. MLP in a training step, and the peak memory of each run (each
config runs in its own process so its peak RSS is its own). With CUDA it also times d16 in bf16
(training tokens/s, sampling images/s at batch 64). Never fails on time.

    .venv/bin/python benchmarks/bench_ar.py [--depth 8] [--batch 32] [--steps 5]

``--anchor`` instead times the configuration of issue 38's VAR anchor — depth 8, width 512,
VAR's options (L2-normalised attention, stochastic depth, V = 4096, 32 latent channels, 1000
classes), batch 8 — at VAR's 680-token schedule and CART's 2066-token one, in fp32 and (where the
CPU runs it natively) bf16: training tokens/s per attention path (``ar.attention``), eager and
with compiled blocks (``ar.compile``, compile time included in what it prints), CFG sampling
images/s (guidance 1.5, top-k 900, top-p 0.96), and the ratios to VAR's official transformer
timed on a 2-core avx512_bf16 AMD EPYC *outside this project* (643 / 1087 training tokens/s in
fp32 / bf16, 1.3 CFG images/s; cartlib measured beside it: 698 / 1313 / 1.3). Paths are timed
in alternation (best of ``--steps`` rounds), so their ratios come from one run.

    .venv/bin/python benchmarks/bench_ar.py --anchor [--steps 2] [--schedules var,cart]
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


# VAR's official transformer (d8, width 512, L = 680, batch 8, VAR's options, run alone) on a
# 2-core avx512_bf16 AMD EPYC, measured outside this project (issue 38); cartlib beside it
VAR_ANCHOR = {"no": 643.0, "bf16": 1087.0, "cfg_images_per_s": 1.3}
CARTLIB_BESIDE_ANCHOR = {"no": 698.0, "bf16": 1313.0, "cfg_images_per_s": 1.3}
ANCHOR_PRESETS = {"var": "var-d16-256", "cart": "cart-d16-256"}  # their schedules and options


def anchor_model(which: str):
    """(model, quantizer, cfg) at the anchor's configuration with ``which``'s schedule."""
    from cartlib.config import load_preset
    from cartlib.model import build_model
    from cartlib.tokenizer import ScheduleQuantizer

    cfg = load_preset(ANCHOR_PRESETS[which], ar={"depth": 8})
    sched, t = cfg.schedule(), cfg.tokenizer
    torch.manual_seed(0)
    model = build_model(cfg, sched, 1000)
    quant = ScheduleQuantizer(sched, t.codebook_size, t.latent_channels).eval()
    return model, quant, cfg


def anchor_rows(which: str, amp: str, rounds: int) -> list[dict]:
    """Training tokens/s of each attention path (and compiled per_step), CFG sampling."""
    from cartlib.model.transformer import attention_path
    from cartlib.sample import generate

    model, quant, cfg = anchor_model(which)
    sched, batch, v = model.schedule, 8, cfg.tokenizer.codebook_size
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(v, (batch, s.h, s.w), generator=g) for s in sched]
    labels = torch.randint(1000, (batch,), generator=g)
    with torch.no_grad():
        inputs = quant.teacher_inputs(tokens)
    target = torch.cat([t.flatten(1) for t in tokens], 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
            logits = model(labels, inputs)
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    variants = {"sdpa": ("sdpa", False), "per_step": ("per_step", False)}
    variants["per_step, compiled"] = ("per_step", True)
    first, best = {}, {}
    for name, (path, compiled) in variants.items():  # warm-up; compiles the blocks once
        model.attention, model.compile_blocks = path, compiled
        first[name], best[name] = step(), float("inf")
    for _ in range(rounds):  # alternate, so that load from elsewhere hits every path alike
        for name, (path, compiled) in variants.items():
            model.attention, model.compile_blocks = path, compiled
            best[name] = min(best[name], step())
    rows = []
    for name, (_, compiled) in variants.items():
        rows.append({"schedule": which, "amp": amp, "path": name, "tokens": sched.seq_len,
                     "train_tokens_per_s": batch * sched.seq_len / best[name],
                     "vs_sdpa": best["sdpa"] / best[name],
                     "compile_s": first[name] - best[name] if compiled else None})  # fmt: skip
    model.attention, model.compile_blocks = "auto", False

    class _Tok(torch.nn.Module):  # the sampler needs quantizer + decode only
        quantizer = quant

        def decode(self, f):
            return f[:, :3].sigmoid()

    def sample() -> float:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
            generate(model, _Tok(), torch.arange(batch), cfg=1.5, top_k=900, top_p=0.96, seed=0)
        return time.perf_counter() - t

    sample()
    t_cfg = min(sample() for _ in range(rounds))
    rows.append({"schedule": which, "amp": amp, "path": "sampling (KV cache, CFG)",
                 "tokens": sched.seq_len, "cfg_images_per_s": batch / t_cfg})  # fmt: skip
    rows.append({"schedule": which, "amp": amp, "auto": attention_path("auto", "cpu")})
    return rows


def anchor_table(args) -> None:
    from cartlib import hardware

    native, why = hardware.cpu_bf16()
    amps = ["no", "bf16"] if native else ["no"]
    print(f"CPU: {hardware.cpu_facts()}, {torch.get_num_threads()} threads; {why}")
    if not native:
        print("bf16 rows skipped: emulated bf16 is an order of magnitude slower (docs/history.md)")
    print("flex: not timed on the CPU — torch 2.14 has no flex backward there (it runs sdpa)")
    rows = []
    for which in args.schedules.split(","):
        for amp in amps:
            cmd = [sys.executable, __file__, "--anchor-one", f"{which}:{amp}"]
            cmd += ["--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows += json.loads(out.strip().splitlines()[-1])
    print("\n| schedule | tokens | amp | path | train tok/s | vs sdpa | vs VAR anchor | note |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "train_tokens_per_s" not in r:
            continue
        anchor = r["train_tokens_per_s"] / VAR_ANCHOR[r["amp"]]
        note = f"compile {r['compile_s']:.0f} s" if r["compile_s"] is not None else ""
        rate = f"{r['train_tokens_per_s']:,.0f} | {r['vs_sdpa']:.2f} | {anchor:.2f}"
        print(f"| {r['schedule']} | {r['tokens']} | {r['amp']} | {r['path']} | {rate} | {note} |")
    for r in rows:
        if "cfg_images_per_s" in r:
            ratio = r["cfg_images_per_s"] / VAR_ANCHOR["cfg_images_per_s"]
            print(
                f"{r['schedule']} ({r['tokens']} tokens, {r['amp']}): CFG sampling "
                f"{r['cfg_images_per_s']:.2f} images/s, {ratio:.2f} x VAR's anchor"
            )
        if "auto" in r:
            print(f"{r['schedule']} ({r['amp']}): ar.attention='auto' on this CPU -> {r['auto']}")
    print(
        f"VAR anchor: {VAR_ANCHOR['no']:.0f} / {VAR_ANCHOR['bf16']:.0f} training tokens/s (fp32 / "
        f"bf16), {VAR_ANCHOR['cfg_images_per_s']} CFG images/s — VAR's official transformer "
        "measured outside this project on a 2-core avx512_bf16 AMD EPYC (cartlib beside it: "
        f"{CARTLIB_BESIDE_ANCHOR['no']:.0f} / {CARTLIB_BESIDE_ANCHOR['bf16']:.0f} / "
        f"{CARTLIB_BESIDE_ANCHOR['cfg_images_per_s']}); ratios against another CPU compare "
        "machines as much as code."
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # name of one config (child process)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="no")
    ap.add_argument("--anchor", action="store_true", help="issue 38's anchor configuration")
    ap.add_argument("--schedules", default="var,cart", help="with --anchor: var, cart or both")
    ap.add_argument("--anchor-one", help=argparse.SUPPRESS)  # schedule:amp (child process)
    args = ap.parse_args()
    if args.anchor_one:
        which, amp = args.anchor_one.split(":")
        print(json.dumps(anchor_rows(which, amp, args.steps)))
        return
    if args.anchor:
        anchor_table(args)
        return
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
