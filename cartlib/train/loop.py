"""The training loop shared by the tokenizer and the next-detail transformer, on accelerate.

One loop (:func:`run_loop`) serves both: in-process on a CPU for smoke runs, and unchanged under
``accelerate launch -m cartlib train-ar ...`` on GPUs. It gives

* exact resume: the batch of step s is a pure function of (seed, s) (:class:`StepSampler`) and
  the checkpoint holds model, optimizer, scheduler and RNG states, so a run killed after step s and
  resumed computes the same step s+1 as one that never stopped;
* atomic checkpoints (``last.pt`` written through a temp file and a rename) every ``ckpt_every``
  steps and at the end;
* a clear error on a non-finite loss that names the step and the last good checkpoint;
* loss curves in ``<dir>/history.json`` and a tqdm progress bar (``progress=False`` in tests).
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch import nn
from tqdm.auto import tqdm

from cartlib.config import load_config
from cartlib.io import atomic_torch_save, atomic_write_bytes, load_checkpoint

CKPT_NAME = "last.pt"


# ------------------------------------------------------------------------------------- accelerate
def make_accelerator(mixed_precision: str = "no", cpu: bool | None = None):
    """An ``accelerate.Accelerator``; in-process (no launcher) its global state is reset first so
    a notebook can train several models with different precision settings."""
    if mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision={mixed_precision!r}: choose 'no', 'bf16' or 'fp16'")
    if cpu is None:
        cpu = not torch.cuda.is_available()
    if "LOCAL_RANK" not in os.environ and "ACCELERATE_MIXED_PRECISION" not in os.environ:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    if cpu and mixed_precision == "fp16":
        raise ValueError("mixed_precision='fp16' needs a GPU; use 'bf16' on CPUs")
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision)


# ------------------------------------------------------------------------------------ checkpoints
def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------ loop
def lr_lambda(warmup: int, total: int, final: float = 0.1) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to ``final`` x the base learning rate."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def run_loop(
    *,
    accelerator,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, Any],
    step_fn: Callable[[int], dict[str, float]],
    total_steps: int,
    ckpt_dir: str | Path,
    ckpt_every: int,
    extra_state: Callable[[], dict[str, Any]] | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    desc: str = "train",
) -> list[dict[str, float]]:
    """Run ``step_fn(step)`` for steps [resume point, total_steps); return the loss history.

    ``stop_after`` ends the loop early after that many steps (checkpointing first): used to
    simulate a kill in tests and to train in slices from a notebook."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / CKPT_NAME
    start, history = 0, []
    if path.exists():
        state = load_checkpoint(path)
        for name, mod in modules.items():
            accelerator.unwrap_model(mod).load_state_dict(state["modules"][name])
        for name, opt in optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        for name, sch in schedulers.items():
            sch.load_state_dict(state["schedulers"][name])
        set_rng_state(state["rng"])
        start, history = state["step"], state["history"]
    end = total_steps if stop_after is None else min(total_steps, start + stop_after)

    def save(step: int) -> None:
        if not accelerator.is_main_process:
            return
        atomic_torch_save(
            {
                "step": step,
                "modules": {
                    n: accelerator.unwrap_model(m).state_dict() for n, m in modules.items()
                },
                "optimizers": {n: o.state_dict() for n, o in optimizers.items()},
                "schedulers": {n: s.state_dict() for n, s in schedulers.items()},
                "rng": rng_state(),
                "history": history,
                **(extra_state() if extra_state else {}),
            },
            path,
        )
        atomic_write_bytes(ckpt_dir / "history.json", json.dumps(history).encode())

    bar = tqdm(
        range(start, end),
        desc=desc,
        disable=not progress or not accelerator.is_main_process,
        initial=start,
        total=total_steps,
        mininterval=1.0,  # a notebook widget update is an iopub message: keep them few (nbval)
    )
    for step in bar:
        logs = step_fn(step)
        bad = {k: v for k, v in logs.items() if not math.isfinite(v)}
        if bad:
            last = (
                f"the last good checkpoint (step {start}) is {path}"
                if path.exists()
                else ("no checkpoint was written yet")
            )
            raise FloatingPointError(
                f"{desc}: non-finite loss at step {step}: {bad}; {last}. Lower the learning "
                "rate, set mixed_precision='no', or check the input data for NaNs"
            )
        history.append({"step": step, **logs})
        bar.set_postfix(
            {k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "rec", "acc")}, refresh=False
        )
        if (step + 1) % ckpt_every == 0 or step + 1 == end:
            save(step + 1)
            start = step + 1
    if end == start and not path.exists():
        save(end)
    return history


def build_optimizer(params, lr: float, weight_decay: float, betas=(0.9, 0.95)):
    """AdamW without weight decay on biases, norms, embeddings and gains (1-D params)."""
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def load_stage(path: str | Path, module: str, how: str, extra: tuple[str, ...] = ()):
    """(config, state dict of ``module``) of a finished stage folder; a missing file is an error
    that says how to produce it (``how``)."""
    path = Path(path)
    for need in ("config.yaml", CKPT_NAME, *extra):
        if not (path / need).exists():
            raise FileNotFoundError(f"{path / need} is missing: train it first ({how})")
    return load_config(path / "config.yaml"), load_checkpoint(path / CKPT_NAME)["modules"][module]
