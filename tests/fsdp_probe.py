"""Train the layout probe's transformer under FSDP (torch's FSDP2 over gloo on CPUs) and save
what each run returned: ``python tests/fsdp_probe.py OUT RUN_DIR:STOP_AFTER[:MICRO] ...`` trains
each run directory in turn (STOP_AFTER 0 = to the end; MICRO a micro-batch for gradient
accumulation, default none), checkpointing every step. Used by
tests/test_fsdp.py under ``accelerate launch`` with 2 CPU processes.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from layout_probe import setup

from cartlib.train import train_ar


def main(out: str, *runs: str) -> None:
    results = {}
    for spec in runs:
        run_dir, stop, *micro = spec.split(":")
        cfg, tok, tokens, labels = setup(int(micro[0]) if micro else 0, fsdp=True, ckpt_every=1)
        model, history = train_ar(
            cfg, run_dir, tok, tokens, labels, 10, progress=False, stop_after=int(stop) or None
        )
        losses = {h["step"]: h["loss"] for h in history}
        results[run_dir] = {"params": model.state_dict(), "loss": losses}
    if dist.get_rank() == 0:
        torch.save({"runs": results, "processes": dist.get_world_size()}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
