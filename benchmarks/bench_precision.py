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

``--step-times`` prints instead the precision row of this device kind: the time of one training
step of the preset's tokenizer and transformer in fp32 and in bf16 (the mean over steps 4-13,
set-up excluded), the ratio, and what ``mixed_precision: auto`` chooses here
(:mod:`cartlib.hardware`). ``--simulate-avx2`` adds the row of an AVX2-only CPU, measured in a
subprocess with torch's and oneDNN's kernels capped at AVX2 (``ATEN_CPU_CAPABILITY=avx2``,
``ONEDNN_MAX_CPU_ISA=AVX2``)::

    .venv/bin/python benchmarks/bench_precision.py --step-times --simulate-avx2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import torch

from cartlib import hardware, train
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


AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
FIRST, LAST = 3, 13  # step time = (time of LAST steps - time of FIRST steps) / (LAST - FIRST)


def step_times(preset: str) -> dict:
    """This device kind's precision row: seconds per training step, fp32 and bf16."""
    cfg = load_preset(preset)
    data = train.tokenizer_training_data(cfg, "train", progress=False)
    tokenizer_cfg = load_preset(preset, mixed_precision="no", tokenizer={"steps": LAST})
    with tempfile.TemporaryDirectory() as root:
        tok, _ = train.train_tokenizer(tokenizer_cfg, root, progress=False, data=data)
    tokens = train.extract_tokens(tok, data[0], data[1], progress=False)
    classes = int(data[2].max()) + 1
    facts = hardware.cpu_facts()
    row = {
        "device": hardware.device().type,
        "torch kernels": facts["capability"],
        "avx512_bf16/amx": f"{facts['avx512_bf16']}/{facts['amx']}",
        "ONEDNN_MAX_CPU_ISA": facts["onednn_isa"] or "-",
        "auto": hardware.auto_precision()[0],
    }
    for precision, name in (("no", "fp32"), ("bf16", "bf16")):
        for stage in ("tokenizer", "transformer"):
            spent = {}
            for steps in (FIRST, LAST):
                section = "tokenizer" if stage == "tokenizer" else "ar"
                c = load_preset(preset, mixed_precision=precision, **{section: {"steps": steps}})
                with tempfile.TemporaryDirectory() as root:
                    t0 = time.perf_counter()
                    if stage == "tokenizer":
                        train.train_tokenizer(c, root, progress=False, data=data)
                    else:
                        train.train_ar(c, root, tok, tokens, data[2], classes, progress=False)
                    spent[steps] = time.perf_counter() - t0
            row[f"{stage} s/step {name}"] = (spent[LAST] - spent[FIRST]) / (LAST - FIRST)
    for stage in ("tokenizer", "transformer"):
        row[f"{stage} bf16/fp32"] = row[f"{stage} s/step bf16"] / row[f"{stage} s/step fp32"]
    return row


def step_time_rows(preset: str, simulate_avx2: bool) -> list[dict]:
    rows = [step_times(preset)]
    if simulate_avx2:
        code = (
            "import json, sys; sys.path.insert(0, 'benchmarks'); import bench_precision as b; "
            f"print('ROW', json.dumps(b.step_times({preset!r})))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, **AVX2}, capture_output=True,
            text=True, check=True,
        ).stdout  # fmt: skip
        rows.append(json.loads(next(ln for ln in out.splitlines() if ln.startswith("ROW "))[4:]))
    return rows


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
    ap.add_argument("--step-times", action="store_true", help="the precision row of this CPU")
    ap.add_argument("--simulate-avx2", action="store_true", help="and of an AVX2-only CPU")
    args = ap.parse_args()
    if args.step_times:
        table(step_time_rows(args.preset, args.simulate_avx2))
        return
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
