"""Mixed precision on this CPU: does bf16 autocast keep the losses and metrics of fp32?

Trains the smoke tokenizer and transformer twice from the same seed — ``mixed_precision="no"``
and ``"bf16"`` — and prints wall time, the final training losses (mean of the last 20 steps), the
held-out reconstruction MSE of the tokenizer and the held-out next-detail cross-entropy of the
transformer. Never fails on time.

    .venv/bin/python benchmarks/bench_precision.py [--preset smoke]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from cartlib import train
from cartlib.config import load_preset
from cartlib.tokenizer.tokenizer import reconstruction_report


@torch.no_grad()
def heldout_ce(model, tok, tokens, labels) -> float:
    sched = model.schedule
    flat = torch.cat([t.flatten(1) for t in tokens], 1).long()
    maps = [t.long() for t in tokens]
    logits = model(labels, tok.quantizer.teacher_inputs(maps))
    ce, _, _ = train.ar_loss(logits, flat, model.level_ids, sched.n_steps)
    return float(ce)


def run(preset: str, precision: str, root: str) -> dict:
    cfg = load_preset(preset, mixed_precision=precision)
    data = train.tokenizer_training_data(cfg, "train", progress=False)
    test = train.tokenizer_training_data(cfg, "test", progress=False)
    t0 = time.perf_counter()
    tok, th = train.train_tokenizer(cfg, root, progress=False, data=data)
    t_tok = time.perf_counter() - t0
    rep = reconstruction_report(tok, test[0], test[1])
    tokens = train.extract_tokens(tok, data[0], data[1], progress=False)
    t0 = time.perf_counter()
    model, ah = train.train_ar(cfg, root, tok, tokens, data[2], 10, progress=False)
    t_ar = time.perf_counter() - t0
    test_tokens = train.extract_tokens(tok, test[0][:256], test[1][:256], progress=False)
    return {
        "precision": precision,
        "tokenizer_s": t_tok,
        "tokenizer_loss": sum(h["loss"] for h in th[-20:]) / 20,
        "recon_mse": rep["mse"],
        "ar_s": t_ar,
        "ar_loss": sum(h["loss"] for h in ah[-20:]) / 20,
        "ar_heldout_ce": heldout_ce(model, tok, test_tokens, test[2][:256]),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="smoke")
    args = ap.parse_args()
    rows = []
    for precision in ("no", "bf16"):
        with tempfile.TemporaryDirectory() as root:
            rows.append(run(args.preset, precision, root))
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print(
            "| "
            + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values())
            + " |"
        )
    fp, bf = rows
    print(
        f"bf16 speed-up: tokenizer {fp['tokenizer_s'] / bf['tokenizer_s']:.2f}x, "
        f"transformer {fp['ar_s'] / bf['ar_s']:.2f}x"
    )


if __name__ == "__main__":
    main()
