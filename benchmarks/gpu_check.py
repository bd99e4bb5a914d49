"""The first thing to run on a GPU: every CUDA path of cartlib once, timed, in one table.

    python benchmarks/gpu_check.py            # one GPU, under 8 minutes on an H200
    python benchmarks/gpu_check.py --dry      # tiny sizes on the CPU, seconds (part of make test)

Synthetic data, no network. Rows:
  decomposition images/s at 256² (Ambrosio-Tortorelli order 3; target >= 1,000 on an H200);
  tokenizer training images/s and peak GiB at 256² (cart-d16-256's tokenizer with LPIPS and the
  discriminator, bases given, bf16) next to the tokenizer stage's memory plan;
  cart-d16 and var-d16 training tokens/s and peak GiB in bf16: plain, with activation
  checkpointing, with FSDP2 in one process — each next to the memory model's estimate
  (cartlib.fit.training_memory);
  sampling images/s at batch 64 with the KV cache and classifier-free guidance;
  whether sampling with a seed is reproducible on this device.
A row that fails prints its error and the script exits 1 after the table; it never fails on time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

from cartlib.config import load_preset
from cartlib.decompose import base_detail
from cartlib.fit import GIB, tokenizer_activation_probe, tokenizer_memory, training_memory
from cartlib.model import build_model
from cartlib.perceptual import lpips_model
from cartlib.sample import generate
from cartlib.tokenizer import Tokenizer
from cartlib.tokenizer.losses import CompoundLoss
from cartlib.train import ar_loss
from cartlib.train.parallel import checkpoint_blocks, shard_per_block

SIZES = {  # (preset, override, micro-batch for the AR rows, sampling batch, decomposition batch)
    "full": ("cart-d16-256", {}, 16, 64, 64),
    "dry": ("smoke", {"ar": {"depth": 2}}, 4, 4, 4),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat: int) -> float:
    """Seconds per call, best of ``repeat`` after one warm-up call (repeat 0: one cold call)."""
    if repeat:
        fn()
    best = float("inf")
    for _ in range(max(1, repeat)):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else float("nan")


def decomposition_row(cfg, device, batch, repeat):
    res = cfg.data.resolution
    x = torch.rand(batch, 3, res, res, device=device)
    s = timed(lambda: base_detail(x, order=cfg.decompose.order), device, repeat)
    return {"images/s": batch / s}


def tokenizer_row(cfg, device, batch, repeat, amp):
    """Training images/s and peak memory of the tokenizer's generator step as train_tokenizer
    runs it (perceptual loss as configured, discriminator on), next to the stage's memory plan
    (cartlib.fit.tokenizer_memory, measured per pixel on the CPU)."""
    res, n = cfg.data.resolution, cfg.order
    t = dataclasses.replace(cfg.tokenizer, gan_start=0, w_gan=cfg.tokenizer.w_gan or 0.1)
    tok = Tokenizer(t, cfg.decompose, res).to(device).train()
    perceptual = lpips_model(check_range=False).to(device) if t.w_lpips > 0 else None
    crit = CompoundLoss(t, perceptual).to(device)
    opt = torch.optim.AdamW([*tok.parameters(), *crit.disc.parameters()], lr=1e-4)
    x = torch.rand(batch, 3, res, res, device=device)
    bases = torch.rand(batch, n, 3, res, res, device=device) if n else None

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = tok(x, bases)
            loss, _ = crit.generator_loss(out, out.target, out.target_base, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    reset_peak(device)
    s = timed(step, device, repeat)
    probe = tokenizer_activation_probe(
        cfg.updated(tokenizer={"w_gan": t.w_gan}), "bf16" if amp else "no"
    )
    est = tokenizer_memory(probe, res, batch)["total"]
    return {"images/s": batch / s, "peak GiB": peak_gib(device), "estimate GiB": est / GIB}


def ar_row(cfg, device, batch, repeat, amp, mode):
    """Training tokens/s and peak memory of the transformer: plain | ckpt | fsdp."""
    sched = cfg.schedule()
    model = build_model(cfg, sched, 1000).to(device)
    n_params = model.num_params()
    quant = Tokenizer(cfg.tokenizer, cfg.decompose, cfg.data.resolution).quantizer.to(device)
    if mode == "ckpt":
        checkpoint_blocks(model)
    if mode == "fsdp":
        shard_per_block(model, "bf16" if amp else "no")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    v = cfg.tokenizer.codebook_size
    maps = [torch.randint(v, (batch, s.h, s.w), device=device) for s in sched]
    targets = torch.cat([m.flatten(1) for m in maps], 1)
    with torch.no_grad():
        inputs = quant.teacher_inputs(maps)
    labels = torch.randint(1000, (batch,), device=device)
    level_ids = sched.level_ids().to(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):  # as train_ar
            logits = model(labels, inputs)
        loss, _, _ = ar_loss(logits, targets, level_ids, sched.n_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    reset_peak(device)
    s = timed(step, device, repeat)
    est = training_memory(
        n_params,
        cfg.ar.depth,
        cfg.ar.model_width,
        sched.seq_len,
        v,
        batch,
        world=1,
        fsdp=mode == "fsdp",
        checkpointing=mode == "ckpt",
        precision="bf16" if amp else "no",
    )
    return {
        "tokens/s": batch * sched.seq_len / s,
        "peak GiB": peak_gib(device),
        "estimate GiB": est["total"] / GIB,
    }


def sampling_rows(cfg, device, batch, amp):
    sched = cfg.schedule()
    model = build_model(cfg, sched, 1000).to(device).eval()
    tok = Tokenizer(cfg.tokenizer, cfg.decompose, cfg.data.resolution).to(device).eval()
    labels = torch.arange(batch) % 1000

    def run(seed):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            return generate(model, tok, labels, cfg=1.5, top_k=900, top_p=0.96, seed=seed)

    s = timed(lambda: run(0), device, 1 if device.type == "cuda" else 0)
    a, b = run(7), run(7)
    same = all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
    return {"images/s": batch / s}, {"reproducible": same}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dry", action="store_true", help="tiny sizes on the CPU (seconds)")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.dry or not torch.cuda.is_available() else "cuda")
    if not args.dry and device.type != "cuda":
        print("no CUDA device: run with --dry on a CPU", file=sys.stderr)
        return 2
    preset, override, mb, sample_batch, dec_batch = SIZES["dry" if args.dry else "full"]
    amp = True
    cart = load_preset(preset, **override)
    var = cart.var_baseline().updated(
        tokenizer={"base_patch_nums": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)} if not args.dry else {}
    )
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    repeat = 0 if args.dry else args.repeat
    rows = [
        (
            "decomposition 256² (order 3)",
            lambda: decomposition_row(cart, device, dec_batch, repeat),
        ),
        ("tokenizer training", lambda: tokenizer_row(cart, device, dec_batch // 4, repeat, amp)),
    ]
    for name, c in (("cart-d16", cart), ("var-d16", var)):
        for mode in ("plain", "ckpt", "fsdp"):
            rows.append(
                (
                    f"{name} training {mode}",
                    lambda c=c, m=mode: ar_row(c, device, mb, repeat, amp, m),
                )
            )
    results, failed = [], 0
    for name, fn in rows:
        try:
            results.append((name, fn()))
        except Exception as e:  # one broken path must not hide the others
            traceback.print_exc()
            results.append((name, {"FAILED": f"{type(e).__name__}: {e}"[:90]}))
            failed += 1
    try:
        speed, repro = sampling_rows(cart, device, sample_batch, amp)
        results += [("sampling (KV cache, CFG 1.5)", speed), ("sampling seeded", repro)]
        failed += not repro["reproducible"]
    except Exception as e:
        traceback.print_exc()
        results.append(("sampling", {"FAILED": f"{type(e).__name__}: {e}"[:90]}))
        failed += 1
    dist.destroy_process_group()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (--dry, tiny sizes)"
    print(f"\n| gpu_check on {name}, torch {torch.__version__} | value |\n|---|---|")
    for row, values in results:
        text = ", ".join(
            f"{k} {v:,.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()
        )
        print(f"| {row} | {text} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
