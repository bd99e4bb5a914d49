"""One optimizer step is the same computation however it is laid out: 1 process with the whole
batch, 1 process with micro-batches and gradient accumulation, 2 processes (gloo, ``accelerate
launch``, see tests/launching.py) with a micro-batch each: the same parameters after 3 steps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launching import accelerate_launch

from cartlib.config import load_preset
from cartlib.train.ar import micro_batches

PROBE = Path(__file__).with_name("layout_probe.py")
TOLERANCE = 5e-5  # max |difference| of any parameter after 3 AdamW steps, fp32 (moved: ~0.04)


def _run(tmp: Path, name: str, micro: int, procs: int = 1) -> dict:
    out = tmp / f"{name}.pt"
    args = [str(PROBE), str(tmp / name), str(micro), str(out)]
    if procs == 1:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    else:
        accelerate_launch(args, procs)
    return torch.load(out)


def _max_diff(a: dict, b: dict) -> float:
    return max((a["params"][k] - b["params"][k]).abs().max().item() for k in a["params"])


def test_whole_batch_accumulation_and_two_processes_give_the_same_parameters(tmp_path):
    whole = _run(tmp_path, "whole", 0)
    accumulated = _run(tmp_path, "accumulated", 4)
    two = _run(tmp_path, "two-processes", 0, procs=2)
    assert (whole["processes"], two["processes"]) == (1, 2)
    moved = max((whole["params"][k] - p).abs().max().item() for k, p in _init().items())
    assert moved > 100 * TOLERANCE  # the steps changed the weights: the comparison means something
    diffs = {"accumulated": _max_diff(whole, accumulated), "2 processes": _max_diff(whole, two)}
    print(f"max |parameter difference| after 3 steps: moved {moved:.3g}, {diffs}")
    assert max(diffs.values()) < TOLERANCE, diffs
    assert whole["loss"] == pytest.approx(accumulated["loss"], rel=1e-5)
    # the logged loss is the whole batch's, averaged over the processes (not rank 0's half)
    assert whole["loss"] == pytest.approx(two["loss"], rel=1e-5)


def _init() -> dict:
    """The transformer's initial parameters in the probe (same seed, no training)."""
    import layout_probe  # noqa: F401  (tests/ is on sys.path under pytest)

    from cartlib.model import build_model
    from cartlib.tokenizer import Tokenizer

    cfg = load_preset("smoke", tokenizer=layout_probe.TOK, ar=layout_probe.AR, mixed_precision="no")
    torch.manual_seed(0)
    tok = Tokenizer(cfg.tokenizer, cfg.decompose, cfg.data.resolution)
    torch.manual_seed(cfg.ar.seed)
    return build_model(cfg, tok.schedule, 10).state_dict()


def test_micro_batches_keep_the_global_batch_or_say_why_not():
    a = load_preset("smoke", ar={"batch_size": 32, "micro_batch": 4}).ar
    assert micro_batches(a, 2) == (4, 4)  # 32 = 4 x 4 accumulation x 2 processes
    assert micro_batches(load_preset("smoke").ar, 1) == (32, 1)
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        micro_batches(a, 3)
    with pytest.raises(ValueError, match="micro_batch=4 does not divide the 2 images"):
        micro_batches(a, 16)
