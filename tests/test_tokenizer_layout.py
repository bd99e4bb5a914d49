"""The tokenizer's step layout: gradient accumulation over micro-batches (what the full-scale
plan chooses when a GPU cannot hold its share of the batch at once) gives the whole batch's
step, on one process and on two, and every process holds the same tokenizer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from launching import accelerate_launch

PROBE = Path(__file__).with_name("tokenizer_layout_probe.py")
TOLERANCE = 5e-5  # max |parameter difference| after 3 fp32 steps (float rounding only)


def _run(tmp_path, micro: int, procs: int) -> dict:
    out = tmp_path / f"m{micro}-p{procs}.pt"
    args = [PROBE, tmp_path / f"run-m{micro}-p{procs}", micro, out]
    if procs == 1:
        import subprocess

        subprocess.run([sys.executable, *map(str, args)], check=True, capture_output=True)
    else:
        accelerate_launch(args, procs)
    got = torch.load(out)
    assert got["processes"] == procs
    return got


def _diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("procs", [1, 2])
def test_micro_batches_give_the_whole_batch_step(tmp_path, procs):
    """8 images (4 per process on two) at once, or in micro-batches of 2 with the discriminator
    on: the same tokenizer after 3 steps, on every process."""
    whole, micro = _run(tmp_path, 0, procs), _run(tmp_path, 2, procs)
    assert whole["rank_diff"] == 0 and micro["rank_diff"] == 0  # one model on every process
    diff = _diff(whole["params"], micro["params"])
    print(f"{procs} process(es): micro-batch 2 vs whole batch, max |diff| {diff:.2g}")
    assert diff < TOLERANCE
    assert whole["loss"] == pytest.approx(micro["loss"], rel=1e-4)
