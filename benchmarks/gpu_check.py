"""The GPU table: what cartlib's training and sampling do on one GPU, next to what it predicts.

    python benchmarks/gpu_check.py --out docs/gpu-table.md         # one H100: <= 8 minutes
    python benchmarks/gpu_check.py --dry --out docs/gpu-table.md   # no GPU: the predictions

Synthetic data, no network. The rows run in turn, each with a time budget (6.5 minutes
together, 8 with start-up, on one H100; a row is never failed on time; --only reruns some):

* decomposition images/s at 256² (Ambrosio-Tortorelli order 3; target >= 1,000 on an H200);
* tokenizer training images/s and peak GiB at 256² (cart-d16-256's tokenizer, LPIPS and the
  discriminator on, bf16) next to the tokenizer stage's memory plan;
* cart-d16-256 and var-d16-256 training at their real sequence length (2066 / 680 tokens),
  micro-batch 16, bf16 autocast, the optimizer training builds (cartlib.train.build_optimizer:
  fused AdamW on CUDA): one row per attention path (``ar.attention``: sdpa, per_step, flex;
  blocks eager, flex's kernel compiled as always) and one for the training default (auto,
  blocks compiled); then cart-d16 with
  activation checkpointing, and under FSDP2 in one process with two micro-batches accumulated
  without gradient sync;
* one d30-width block (width 1920, 30 heads, 2066 tokens, micro-batch 16, per_step);
* var-d30-256 on one GPU at micro-batch 16: one micro-batch per step, then two accumulated (what
  one GPU of the 16 x 80 GB layout holds: DDP's bucket is one process's accumulated gradients);
* sampling images/s (batch 64, KV cache, CFG 1.5), seeded reproducibility, and VAR's official
  sampler at the same size when its source is importable (--var-source or VAR_SOURCE, a
  checkout of github.com/FoundationVision/VAR; else skipped, saying so).

Columns: tokens/s; model FLOPs per token (training = 3 x the forward, attention counted dense:
cartlib.fit.ar_forward_flops); MFU against the card's dense bf16 peak (PEAK_BF16_TFLOPS:
datasheet values, assumed); peak GiB (torch.cuda.max_memory_allocated over the timed steps)
against cartlib.fit.training_memory; the attention kernel that ran (aten op names seen by
torch.profiler); the assumption each row confirms (docs/memory-model.md).

--dry: every row's prediction (layout, FLOPs per token, peak GiB, budget) and the command that
measures it; each row's code also runs once at a tiny size on the CPU ("tiny run"), so that the
table is known to run before a GPU sees it. Writes OUT (markdown) and OUT with .json; a row that
fails prints its error and the script exits 1 after the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from cartlib.config import ConfigError, load_preset
from cartlib.decompose import base_detail
from cartlib.fit import (
    GIB,
    ar_forward_flops,
    tokenizer_activation_probe,
    tokenizer_memory,
    training_memory,
)
from cartlib.model import build_model
from cartlib.model import transformer as tf
from cartlib.perceptual import lpips_model
from cartlib.sample import generate
from cartlib.tokenizer import Tokenizer
from cartlib.tokenizer.losses import CompoundLoss
from cartlib.train import ar_loss, build_optimizer
from cartlib.train.parallel import checkpoint_blocks, shard_per_block

COMMAND = "python benchmarks/gpu_check.py --out docs/gpu-table.md"
PEAK_BF16_TFLOPS = (  # dense, by a substring of the device name: datasheet values (assumed)
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
)  # fmt: skip
SDPA_KERNELS = {  # aten op -> the SDPA backend it is
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "mem-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "cpu-flash",
    "aten::_scaled_dot_product_attention_math": "math",
}
VAR_D16 = {  # VAR's build_vae_var arguments for its d16 model at 256² (its demo's settings)
    "V": 4096, "Cvae": 32, "ch": 160, "share_quant_resi": 4, "num_classes": 1000, "depth": 16,
    "shared_aln": False, "patch_nums": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
}  # fmt: skip


class Skip(Exception):
    """A row that cannot run here, with the reason."""


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    kind: str  # decomposition | tokenizer | train | block | sampling | seeded | var-sampler
    budget_s: int
    confirms: str
    preset: str = "cart-d16-256"
    attention: str = "per_step"
    micro: int = 16
    accumulation: int = 1
    layout: str = "plain"  # plain | ckpt | fsdp (one process)
    compiled: bool = False


def _paths(preset: str, budgets: tuple[int, int, int, int]) -> list[Row]:
    short = preset.removesuffix("-256")
    sdpa, per_step, flex, auto = budgets
    return [
        Row(f"{short} sdpa", "train", sdpa, "activations as measured on the CPU (sdpa); the "
            "additive L² mask per block; which kernel takes the boolean mask", preset, "sdpa"),
        Row(f"{short} per_step", "train", per_step, "per_step's activations (+2 B per token x "
            "width); unmasked Flash/cuDNN; faster than sdpa (auto's choice)", preset, "per_step"),
        Row(f"{short} flex", "train", flex, "flex's activations = sdpa's (assumed); its speed "
            "against per_step (compile time excluded)", preset, "flex"),
        Row(f"{short} auto, compiled", "train", auto, "the training default: compiled blocks' "
            "memory against the eager estimate", preset, "auto", compiled=True),
    ]  # fmt: skip


ROWS = (
    Row("decomposition 256² (order 3)", "decomposition", 10, "decomposition on the GPU: "
        ">= 1,000 img/s on an H200 (target)", micro=64),
    Row("tokenizer training 256²", "tokenizer", 25, "the tokenizer plan: per-pixel activations "
        "(CPU-probed in bf16) and 2 B/param weight copies"),
    *_paths("cart-d16-256", (15, 15, 40, 45)),
    *_paths("var-d16-256", (10, 10, 35, 35)),
    Row("cart-d16 per_step, checkpointing", "train", 15, "checkpointing: 4 B per token x width "
        "per block plus one block", layout="ckpt"),
    Row("cart-d16 per_step, FSDP2 x2 no-sync", "train", 20, "FSDP2: fp32 no-sync accumulation "
        "(4 B/param), two gathered blocks + one fp32 reduce-scatter input", layout="fsdp",
        accumulation=2),
    Row("d30-width block", "block", 10, "the d30 width's kernels (30 heads of 64): tokens/s and "
        "MFU of one block", "cart-d30-256"),
    Row("var-d30 1 GPU x1", "train", 30, "bf16 weight copies (2 B/param); no gradients before "
        "the first backward (set_to_none)", "var-d30-256"),
    Row("var-d30 1 GPU x2", "train", 20, "one GPU of var-d30's 16 x 80 GB layout (16 x 4, DDP "
        "bucket = accumulated gradients)", "var-d30-256", accumulation=2),
    Row("sampling (KV cache, CFG 1.5)", "sampling", 20, "sampling throughput, batch 64", micro=64),
    Row("sampling seeded", "seeded", 10, "a seed gives the same tokens twice on CUDA", micro=8),
    Row("VAR's sampler (d16, CFG 1.5)", "var-sampler", 20, "cartlib's sampler against VAR's "
        "autoregressive_infer_cfg at the same size", "var-d16-256", micro=64),
)  # fmt: skip


# ------------------------------------------------------------------------------------ configs
def config(row: Row, tiny: bool):
    """The row's run config (tiny: smoke-sized, same order), with its attention path."""
    cfg = load_preset(row.preset)
    if tiny:
        smoke = load_preset("smoke", ar={"depth": 2})
        cfg = smoke.var_baseline() if cfg.order == 0 else smoke
    if row.kind not in ("train", "block"):
        return cfg
    try:  # the tiny run stays eager: inductor on a CPU takes minutes
        return cfg.updated(ar={"attention": row.attention, "compile": row.compiled and not tiny})
    except ConfigError as e:
        raise Skip(f"this cartlib has no ar.attention={row.attention!r}: {e}") from None


def block_of(cfg, width: int | None = None):
    """One transformer block of ``cfg`` (at ``width``: heads of 64) and its schedule."""
    a = cfg.ar
    width = width or a.model_width
    block = tf.Block(width, max(1, width // 64), a.mlp_ratio, a.dropout, a.attn_l2_norm,
                     a.drop_path_rate or 0.1)  # fmt: skip
    return block, cfg.schedule()


def predict(row: Row, cache: dict, probe_tokenizer: bool) -> dict:
    """What the row should measure: layout, model FLOPs per token, peak GiB. The tokenizer's
    plan rests on a bf16 probe (``probe_tokenizer``: here; else on the GPU, when it runs)."""
    layouts = {
        "decomposition": f"{row.micro} images 256², order 3",
        "tokenizer": f"{row.micro} images 256², 1 GPU, bf16, LPIPS + discriminator",
        "sampling": f"{row.micro} images, KV cache, bf16",
        "seeded": f"{row.micro} images, seed 7 twice",
        "var-sampler": f"{row.micro} images, VAR's d16, random weights, bf16",
    }
    if row.kind in layouts:
        out = {"layout": layouts[row.kind]}
        if row.kind == "tokenizer" and probe_tokenizer:
            probe = tokenizer_activation_probe(config(row, tiny=False), "bf16")
            out["predicted_gib"] = tokenizer_memory(probe, 256, row.micro)["total"] / GIB
        return out
    cfg = config(row, tiny=False)
    sched, a = cfg.schedule(), cfg.ar
    path = tf.attention_path(row.attention, "cuda") if hasattr(tf, "attention_path") else "sdpa"
    L, v = sched.seq_len, cfg.tokenizer.codebook_size
    if row.kind == "block":
        with torch.device("meta"):
            block, _ = block_of(cfg)
        n, depth, width, v = sum(p.numel() for p in block.parameters()), 1, a.model_width, 0
        key = ("block", row.preset)
        if key not in cache:
            x, cond = torch.empty(1, L, width, device="meta"), torch.empty(1, width, device="meta")
            with FlopCounterMode(display=False) as counter:
                block(x, cond, sched.attn_mask("meta"))
            cache[key] = 3 * counter.get_total_flops() / L, n
    else:
        depth, width, key = a.depth, a.model_width, ("model", row.preset)
        if key not in cache:
            n = build_model(cfg, sched, 1000, device="meta").num_params()
            cache[key] = 3 * ar_forward_flops(cfg) / L, n
        n = cache[key][1]
    est = training_memory(
        n, depth, width, L, v, row.micro, fsdp=row.layout == "fsdp",
        checkpointing=row.layout == "ckpt", accumulation=row.accumulation, attention=path,
    )  # fmt: skip
    shard = {"plain": "1 GPU", "ckpt": "1 GPU, checkpointing", "fsdp": "FSDP2 (1 process)"}
    return {
        "layout": f"{row.micro} x {row.accumulation} of {L} tokens, {shard[row.layout]}, bf16, "
        f"{'compiled' if row.compiled else 'eager'}",
        "params": n,
        "gflop_per_token": cache[key][0] / 1e9,
        "predicted_gib": est["total"] / GIB,
    }


# ------------------------------------------------------------------------------------ measuring
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat: int) -> float:
    """Seconds per call, best of ``repeat`` (0: one call)."""
    best = float("inf")
    for _ in range(max(1, repeat)):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def fresh_peak(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else None


def kernels(fn, path: str) -> str:
    """The attention kernels one call of ``fn`` ran: the SDPA backends by their aten ops, flex
    by its autograd op or its compiled (templated Triton) kernels, as torch.profiler saw them."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    activities += [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
    with profile(activities=activities) as prof:
        fn()
    names = {e.key for e in prof.key_averages()}
    seen = sorted({label for op, label in SDPA_KERNELS.items() if op in names})
    if any("flex" in n.lower() or n.startswith("triton_tem") for n in names):
        seen.append("flex")
    return f"{path}: {'+'.join(seen) or 'explicit matmul/softmax'}"


def measure(step, device, repeat: int, path: str, tokens: int) -> dict:
    """tokens/s (best of ``repeat`` steps after a warm-up), the peak GiB of those steps, and
    the attention kernels of one more; ``repeat`` 0 (the tiny run): the kernels only."""
    if repeat == 0:
        return {"kernel": kernels(step, path)}
    step()  # warm-up: optimizer state, compilation, allocator
    fresh_peak(device)
    s = timed(step, device, repeat)
    out = {"tokens/s": tokens / s, "peak_gib": peak_gib(device), "s_per_step": s}
    out["kernel"] = kernels(step, path)
    return out


def train_row(row: Row, cfg, device, repeat: int) -> dict:
    """Training steps as train_ar runs them (bf16 autocast, fp32 loss, build_optimizer)."""
    sched, b = cfg.schedule(), row.micro if device.type == "cuda" else 2
    model = build_model(cfg, sched, 1000, device=device)
    if row.layout == "ckpt":
        checkpoint_blocks(model)
    if row.layout == "fsdp":
        shard_per_block(model, "bf16")
    opt = build_optimizer(model, 1e-4, 0.05)
    v, first = cfg.tokenizer.codebook_size, sched[0].h * sched[0].w
    inputs = torch.randn(b, sched.seq_len - first, cfg.tokenizer.latent_channels, device=device)
    targets = torch.randint(v, (b, sched.seq_len), device=device)
    labels, level_ids = torch.randint(1000, (b,), device=device), sched.level_ids().to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        for i in range(row.accumulation):
            if row.layout == "fsdp":
                model.set_requires_gradient_sync(i == row.accumulation - 1)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = model(labels, inputs)
            loss = ar_loss(logits, targets, level_ids, sched.n_steps)[0]
            (loss / row.accumulation).backward()
        opt.step()

    path = tf.attention_path(row.attention, device) if hasattr(tf, "attention_path") else "sdpa"
    return measure(step, device, repeat, path, b * row.accumulation * sched.seq_len)


def block_row(row: Row, cfg, device, repeat: int) -> dict:
    block, sched = block_of(cfg, None if device.type == "cuda" else 64)
    block = block.to(device).train()
    b, width = (row.micro if device.type == "cuda" else 2), block.norm1.normalized_shape[0]
    if hasattr(tf, "BlockCausal") and row.attention != "sdpa":
        mask = tf.BlockCausal.build(sched, tf.attention_path(row.attention, device), device)
    else:
        mask = sched.attn_mask(device)
    opt = build_optimizer(block, 1e-4, 0.05)
    x = torch.randn(b, sched.seq_len, width, device=device, requires_grad=True)
    cond = torch.randn(b, width, device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = block(x, cond, mask)
        out.float().square().mean().backward()
        opt.step()

    path = getattr(mask, "path", "sdpa")
    return measure(step, device, repeat, path, b * sched.seq_len)


def decomposition_row(row: Row, cfg, device, repeat: int) -> dict:
    res, b = cfg.data.resolution, row.micro if device.type == "cuda" else 2
    x = torch.rand(b, 3, res, res, device=device)
    run = lambda: base_detail(x, order=cfg.decompose.order)  # noqa: E731
    run()
    return {"images/s": b / timed(run, device, repeat)}


def tokenizer_row(row: Row, cfg, device, repeat: int) -> dict:
    """Training images/s and peak memory of the tokenizer's generator step as train_tokenizer
    runs it, next to the stage's memory plan (cartlib.fit.tokenizer_memory)."""
    res, n, b = cfg.data.resolution, cfg.order, row.micro if device.type == "cuda" else 2
    t = dataclasses.replace(cfg.tokenizer, gan_start=0, w_gan=cfg.tokenizer.w_gan or 0.1)
    tok = Tokenizer(t, cfg.decompose, res).to(device).train()
    perceptual = lpips_model(check_range=False).to(device) if t.w_lpips > 0 else None
    crit = CompoundLoss(t, perceptual).to(device)
    opt = build_optimizer([*tok.parameters(), *crit.disc.parameters()], 1e-4, 0.0)
    x = torch.rand(b, 3, res, res, device=device)
    bases = torch.rand(b, n, 3, res, res, device=device) if n else None

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = tok(x, bases)
            loss, _ = crit.generator_loss(out, out.target, out.target_base, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    fresh_peak(device)
    s = timed(step, device, repeat)
    probe = tokenizer_activation_probe(cfg.updated(tokenizer={"w_gan": t.w_gan}), "bf16",
                                       device=device.type)  # fmt: skip
    est = tokenizer_memory(probe, res, b)["total"]
    return {"images/s": b / s, "peak_gib": peak_gib(device), "predicted_gib": est / GIB}


def sampling_row(row: Row, cfg, device, repeat: int) -> dict:
    sched, b = cfg.schedule(), row.micro if device.type == "cuda" else 2
    model = build_model(cfg, sched, 1000, device=device).eval()
    tok = Tokenizer(cfg.tokenizer, cfg.decompose, cfg.data.resolution).to(device).eval()
    labels = torch.arange(b) % 1000

    def run(seed):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return generate(model, tok, labels, cfg=1.5, top_k=900, top_p=0.96, seed=seed)

    if row.kind == "seeded":
        a, c = run(7), run(7)
        return {"reproducible": all(torch.equal(x, y) for x, y in zip(a.tokens, c.tokens))}
    run(0)
    return {"images/s": b / timed(lambda: run(0), device, min(repeat, 2))}


def var_sampler_row(row: Row, cfg, device, repeat: int, source: str | None) -> dict:
    """VAR's own sampler (github.com/FoundationVision/VAR: models.build_vae_var, the
    autoregressive_infer_cfg of its demo) at cartlib's d16 size, random weights, bf16."""
    if not source or device.type != "cuda":
        raise Skip("VAR's source is not importable here: give --var-source DIR (a checkout of "
                   "github.com/FoundationVision/VAR) on a GPU to time its sampler")  # fmt: skip
    sys.path.insert(0, source)
    try:
        from models import build_vae_var
    except ImportError as e:
        raise Skip(f"VAR's source at {source} does not import: {e}") from None
    _, var = build_vae_var(device=device, **VAR_D16)
    labels = torch.arange(row.micro, device=device) % 1000
    sampling = {"cfg": 1.5, "top_k": 900, "top_p": 0.96, "g_seed": 0, "more_smooth": False}

    def run():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            var.autoregressive_infer_cfg(B=row.micro, label_B=labels, **sampling)

    run()
    return {"images/s": row.micro / timed(run, device, min(repeat, 2))}


def run_row(row: Row, device, repeat: int, var_source: str | None) -> dict:
    cfg = config(row, tiny=device.type != "cuda")
    runs = {"train": train_row, "block": block_row, "decomposition": decomposition_row,
            "tokenizer": tokenizer_row, "sampling": sampling_row,
            "seeded": sampling_row}  # fmt: skip
    if row.kind == "var-sampler":
        return var_sampler_row(row, cfg, device, repeat, var_source)
    return runs[row.kind](row, cfg, device, repeat)


def run_entry(row: Row, args, device, cache: dict, peak: float | None) -> dict:
    """The row's table entry: prediction, then measurement (a tiny run on the CPU: whether it
    ran and its kernel); a skip or a failure is said in ``status``."""
    entry = {"row": row.name, "budget_s": row.budget_s, "confirms": row.confirms, "status": ""}
    cuda, t = device.type == "cuda", time.perf_counter()
    try:
        entry.update(predict(row, cache, probe_tokenizer=args.dry and not args.quick))
        measured = run_row(row, device, args.repeat if cuda else 0, args.var_source)
        if not cuda:  # a tiny size's numbers mean nothing: that it ran and its kernel do
            entry["status"] = "ok" + (f": {measured['kernel']}" if "kernel" in measured else "")
        else:
            for key in ("peak_gib", "tokens/s", "kernel", "predicted_gib"):
                if key in measured:
                    entry[key] = measured.pop(key)
            entry["other"] = measured
        if cuda and peak and "tokens/s" in entry and "gflop_per_token" in entry:
            entry["mfu"] = entry["tokens/s"] * entry["gflop_per_token"] * 1e9 / (peak * 1e12)
    except Skip as e:
        entry["status"] = f"skipped: {e}"
    except Exception as e:  # one broken path must not hide the others
        traceback.print_exc()
        entry["status"] = f"FAILED: {type(e).__name__}: {e}"[:200]
    if row.compiled:  # its compiled graphs go with its model
        torch._dynamo.reset()
    entry["seconds"] = round(time.perf_counter() - t, 1)
    return entry


# ------------------------------------------------------------------------------------ the table
def peak_tflops(name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def fmt(value, spec: str = ",.0f") -> str:
    if value is None or value == "":
        return ""
    return format(value, spec) if isinstance(value, float | int) else str(value)


def markdown(report: dict) -> str:
    dry = report["mode"] == "dry"
    head = (
        f"# GPU table: {report['device']}, torch {report['torch']} ({report['date']})\n\n"
        f"{report['note']}\n\nFilled in on one H100 by `{COMMAND}` (about "
        f"{sum(r.budget_s for r in ROWS) // 60 + 1} minutes; the budget column per row; "
        "`--only NAME,...` reruns the rows whose names contain one of them). "
        "MFU: against the card's dense bf16 peak, assumed from datasheets "
        f"({', '.join(f'{k} {v:.0f}' for k, v in PEAK_BF16_TFLOPS)} TFLOPS). Model FLOPs: "
        "training = 3 x forward, attention counted dense (all L² pairs). Predicted peak: "
        "cartlib.fit.training_memory (docs/memory-model.md names each term and its source).\n\n"
    )
    cols = ["row", "layout", "GFLOP/token", "predicted GiB", "budget s", "confirms"]
    cols += ["tiny run (CPU)"] if dry else ["peak GiB", "tokens/s", "MFU", "kernel", "s", "other"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in report["rows"]:
        cells = [r["row"], r.get("layout", ""), fmt(r.get("gflop_per_token"), ".2f"),
                 fmt(r.get("predicted_gib"), ".1f"), fmt(r["budget_s"]), r["confirms"]]  # fmt: skip
        if dry:
            cells.append(r["status"])
        else:
            mfu = r.get("mfu")
            other = ", ".join(f"{k} {fmt(v, ',.2f')}" for k, v in r.get("other", {}).items())
            cells += [fmt(r.get("peak_gib"), ".1f"), fmt(r.get("tokens/s")),
                      fmt(mfu * 100, ".0f") + " %" if mfu else "", r.get("kernel", ""),
                      fmt(r["seconds"]), other or r["status"]]  # fmt: skip
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dry", action="store_true", help="predictions + a tiny CPU run (no GPU)")
    p.add_argument("--out", default="docs/gpu-table.md", help="markdown table; JSON beside it")
    p.add_argument("--repeat", type=int, default=3, help="timed steps per row (best is kept)")
    p.add_argument("--only", default="", help="rows whose name contains this (comma-separated)")
    p.add_argument("--var-source", default=os.environ.get("VAR_SOURCE"), help="VAR checkout")
    p.add_argument("--quick", action="store_true", help="--dry without the tokenizer's bf16 "
                   "probe (minutes on a CPU without native bf16)")  # fmt: skip
    p.add_argument("--note", default="", help="a line under the title")
    p.add_argument("--date", default=datetime.date.today().isoformat())
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry
    if not args.dry and not cuda:
        print("no CUDA device: run with --dry on a CPU", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # a free one: tests run it beside other process groups
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    name = torch.cuda.get_device_name() if cuda else "no GPU (dry run)"
    wanted = [w for w in args.only.split(",") if w]
    rows, cache, started = [], {}, time.perf_counter()
    for row in ROWS:
        if not wanted or any(w in row.name for w in wanted):
            rows.append(run_entry(row, args, device, cache, peak_tflops(name)))
            if not args.dry:
                print(f"{row.name}: {rows[-1]}", flush=True)
    dist.destroy_process_group()
    note = args.note or ("dry run: predictions only, no GPU" if args.dry else "measured")
    report = {"mode": "dry" if args.dry else "measured", "device": name, "date": args.date,
              "torch": torch.__version__, "note": note, "command": COMMAND,
              "seconds": round(time.perf_counter() - started), "rows": rows}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = markdown(report)
    out.write_text(table)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    print(table)
    bad = [r for r in rows if r["status"].startswith("FAILED")]
    bad += [r for r in rows if r.get("other", {}).get("reproducible") is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
