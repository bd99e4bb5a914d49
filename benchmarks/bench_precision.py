"""Mixed precision on this CPU: where does bf16 autocast cost the transformer held-out CE?

The tokenizer is trained twice from the same seed (``mixed_precision`` "no" and "bf16"): wall
time, final loss, held-out reconstruction MSE. The transformer is then trained in several
variants, each from the same seed, and scored by its held-out next-detail cross-entropy (always
evaluated in fp32):

* on the tokens of the *fp32* tokenizer — so every variant learns the same sequences:
  fp32; bf16 (attention computed explicitly, as on CPUs by default); bf16 with the fused SDPA
  kernel instead (its softmax accumulates in fp32); bf16 with the output head and logits in
  fp32; fp32 with a second seed (the run-to-run spread); fp32 with VAR's details (L2-normalised
  attention, VAR's init, lin0 schedule) for the small presets' choice;
* on the tokens of the *bf16* tokenizer (fp32 and bf16): the comparison the first version of
  this benchmark made, where tokenizer and transformer both changed.

Never fails on time. ``--quick`` runs the fp32/bf16 pair on the fp32 tokenizer's tokens only,
``--runs NAME ...`` the named transformer runs (and only the tokenizers they need).

    .venv/bin/python benchmarks/bench_precision.py [--preset smoke] [--quick] [--runs fp32 ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import contextmanager

import torch

from cartlib import train
from cartlib.config import load_preset
from cartlib.model import transformer
from cartlib.tokenizer.tokenizer import reconstruction_report

VAR_DETAILS = {
    "attn_l2_norm": True,
    "drop_path": None,
    "init_adaln": 0.5,
    "init_adaln_gamma": 1e-3,
    "init_head": 0.02,
    "init_residual_scale": True,
    "lr_schedule": "lin0",
}


@torch.no_grad()
def heldout_ce(model, tok, tokens, labels) -> tuple[float, list[float]]:
    """Mean held-out cross-entropy (fp32, no autocast) and its value per token map."""
    sched = model.schedule
    flat = torch.cat([t.flatten(1) for t in tokens], 1).long()
    maps = [t.long() for t in tokens]
    logits = model(labels, tok.quantizer.teacher_inputs(maps))
    ce, per_step, _ = train.ar_loss(logits, flat, model.level_ids, sched.n_steps)
    return float(ce), [round(float(v), 3) for v in per_step]


@contextmanager
def variant(name: str):
    """Patch the model for one bf16 variant: fused attention, or an fp32 head."""
    saved_explicit = transformer.SelfAttention.cpu_bf16_explicit
    saved_logits = transformer.NextDetailTransformer.logits
    if name == "sdpa":
        transformer.SelfAttention.cpu_bf16_explicit = False
    if name == "fp32_head":

        def logits(self, x, cond):
            with torch.autocast(x.device.type, enabled=False):
                return saved_logits(self, x.float(), cond.float())

        transformer.NextDetailTransformer.logits = logits
    try:
        yield
    finally:
        transformer.SelfAttention.cpu_bf16_explicit = saved_explicit
        transformer.NextDetailTransformer.logits = saved_logits


def train_tokenizer(preset: str, precision: str, root: str, data, test) -> tuple:
    cfg = load_preset(preset, mixed_precision=precision)
    t0 = time.perf_counter()
    tok, hist = train.train_tokenizer(cfg, root, progress=False, data=data)
    row = {
        "tokenizer": precision,
        "seconds": time.perf_counter() - t0,
        "final_loss": sum(h["loss"] for h in hist[-20:]) / 20,
        "heldout_mse": reconstruction_report(tok, test[0], test[1])["mse"],
    }
    return tok, row


def train_ar(preset, precision, patch, tok, tokens, labels, test_tokens, test_labels, **ar):
    cfg = load_preset(preset, mixed_precision=precision, ar=ar)
    with tempfile.TemporaryDirectory() as root, variant(patch):
        t0 = time.perf_counter()
        model, hist = train.train_ar(cfg, root, tok, tokens, labels, 10, progress=False)
        seconds = time.perf_counter() - t0
    ce, per_step = heldout_ce(model, tok, test_tokens, test_labels)
    return {
        "seconds": seconds,
        "train_loss": sum(h["loss"] for h in hist[-20:]) / 20,
        "heldout_ce": ce,
        "per_step": per_step,
    }


def table(rows: list[dict]) -> None:
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="smoke")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", nargs="*", help="names of the transformer runs (default: all)")
    args = ap.parse_args()
    runs = {  # name: (tokens of the tokenizer trained in, AR precision, patch, AR overrides)
        "fp32": ("no", "no", "", {}),
        "bf16": ("no", "bf16", "", {}),
        "bf16-sdpa": ("no", "bf16", "sdpa", {}),
        "bf16-fp32-head": ("no", "bf16", "fp32_head", {}),
        "fp32-seed1": ("no", "no", "", {"seed": 1}),
        "fp32-var": ("no", "no", "", VAR_DETAILS),
        "bf16tok-fp32": ("bf16", "no", "", {}),
        "bf16tok-bf16": ("bf16", "bf16", "", {}),
    }
    names = args.runs or (["fp32", "bf16"] if args.quick else list(runs))
    unknown = set(names) - set(runs)
    if unknown:
        raise SystemExit(f"unknown runs {sorted(unknown)}; choose from {', '.join(runs)}")
    cfg = load_preset(args.preset)
    data = train.tokenizer_training_data(cfg, "train", progress=False)
    test = train.tokenizer_training_data(cfg, "test", progress=False)
    toks, tok_rows = {}, []
    wanted = {runs[n][0] for n in names}
    for precision in [p for p in ("no", "bf16") if p in wanted]:
        with tempfile.TemporaryDirectory() as root:
            toks[precision], row = train_tokenizer(args.preset, precision, root, data, test)
        tok_rows.append(row)
        print(row, flush=True)
    table(tok_rows)
    tokens = {
        p: (
            train.extract_tokens(tok, data[0], data[1], progress=False),
            train.extract_tokens(tok, test[0][:256], test[1][:256], progress=False),
        )
        for p, tok in toks.items()
    }
    rows = []
    for name in names:
        tok_prec, precision, patch, ar = runs[name]
        train_tokens, test_tokens = tokens[tok_prec]
        r = train_ar(args.preset, precision, patch, toks[tok_prec], train_tokens, data[2],
                     test_tokens, test[2][:256], **ar)  # fmt: skip
        rows.append({"run": name, "tokens of": tok_prec, "AR": precision, **r})
        print(rows[-1], flush=True)
    table(rows)


if __name__ == "__main__":
    main()
