"""Straight-through "cartlib" vs "var": held-out reconstruction and code usage of the tokenizer.

    .venv/bin/python benchmarks/bench_straight_through.py [--preset smoke] [--steps N] [--test 256]
        [--seed S]

Trains the preset's tokenizer twice, from the same seed, on the same in-memory training split
(``mixed_precision="no"``, a temporary run directory): once with ``straight_through: cartlib``
(the decoder's gradient reaches encoder, codebook and phi convs) and once with ``var`` (encoder
only, as VAR's VQ-VAE). Prints for each the held-out MSE of the full reconstruction and of the
base-only one (against B_n), the fraction of codes the held-out images use, the code perplexity,
the training time, and the var / cartlib ratios. See docs/straight-through.md. Never part of the
test pass/fail; the numbers move with the machine's other load (time only) and the step count.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from cartlib import train
from cartlib.config import load_preset
from cartlib.tokenizer.tokenizer import reconstruction_report

MODES = ("cartlib", "var")


def run(preset: str, mode: str, steps: int | None, seed: int, data, test) -> dict:
    tokenizer = {"straight_through": mode, "seed": seed, **({"steps": steps} if steps else {})}
    cfg = load_preset(preset, mixed_precision="no", tokenizer=tokenizer)
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        tok, hist = train.train_tokenizer(cfg, root, progress=False, data=data)
        seconds = time.perf_counter() - t0
    report = reconstruction_report(tok, test[0], test[1])
    return {
        "mode": mode,
        "steps": cfg.tokenizer.steps,
        "seconds": seconds,
        "final_loss": sum(h["loss"] for h in hist[-10:]) / len(hist[-10:]),
        "mse": report["mse"],
        "base_mse": report.get("base_mse", float("nan")),
        "usage": report["usage"],
        "perplexity": report["perplexity"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="smoke")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: preset's)")
    p.add_argument("--test", type=int, default=256, help="held-out images")
    p.add_argument("--seed", type=int, default=0, help="tokenizer.seed of both runs")
    a = p.parse_args()
    cfg = load_preset(a.preset, data={"test_limit": a.test})
    data = train.tokenizer_training_data(cfg, "train", progress=False)
    images, bases, _ = train.tokenizer_training_data(cfg, "test", progress=False)
    test = (images.float(), None if bases is None else bases.float())
    print(
        f"preset {a.preset}: {len(data[0])} training images, {len(images)} held-out, "
        f"{torch.get_num_threads()} threads, fp32, seed {a.seed}\n"
    )
    rows = [run(a.preset, mode, a.steps, a.seed, data, test) for mode in MODES]
    print("| straight_through | steps | time s | train loss | held-out MSE | base MSE | "
          "code usage | perplexity |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['steps']} | {r['seconds']:.0f} | {r['final_loss']:.4f} | "
            f"{r['mse']:.5f} | {r['base_mse']:.5f} | {100 * r['usage']:.1f} % | "
            f"{r['perplexity']:.1f} |"
        )
    c, v = rows
    print(
        f"\nvar / cartlib: held-out MSE x{v['mse'] / c['mse']:.3f}, base MSE "
        f"x{v['base_mse'] / c['base_mse']:.3f}, code usage x{v['usage'] / c['usage']:.3f}, "
        f"perplexity x{v['perplexity'] / c['perplexity']:.3f}"
    )


if __name__ == "__main__":
    main()
