"""Scale-out: decide where a training run goes, and launch it there.

A notebook never forks CUDA work itself. :func:`plan_ar` looks at the config and the machine:

* ``in-process`` — small runs (the smoke/tiny presets): trained right here, on CPU or one GPU;
* ``launch`` — full-scale runs on a machine with GPUs: the config is written to the run
  directory and ``accelerate launch -m cartlib train-ar --config ...`` runs it; the notebook
  streams its output and reads the run directory back afterwards;
* ``explain`` — a full-scale run on a machine without the GPUs it needs (or data that is not
  here): the whole config is validated (schedule, model size, data location, memory) and
  :func:`explain_and_stop` prints what it would need and the exact command to run elsewhere, then
  raises :class:`NothingTrainedError` — never a silent tiny run, and never a success exit code
  (papermill, ``python -m cartlib train-ar``) for a run that trained nothing.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cartlib.config import RunConfig, save_config
from cartlib.data import imagefolder_num_classes, load_dataset_from_config
from cartlib.model import build_model

# A run is "full scale" when its transformer or images are beyond what a CPU trains in minutes.
FULL_SCALE_DEPTH = 12
FULL_SCALE_RESOLUTION = 128
DEPTH_PRESETS = (16, 20, 24, 30)


class NothingTrainedError(RuntimeError):
    """A training that was asked for cannot run here; the explanation was printed before."""


@dataclass
class Plan:
    mode: str  # in-process | launch | explain
    n_params: int
    seq_len: int
    schedule: str
    gpus_needed: int
    gpu_mem_gib: float  # estimated peak per GPU (training)
    command: str
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"mode: {self.mode}",
            f"transformer: {self.n_params / 1e6:.1f}M parameters, {self.seq_len} tokens per image",
            f"schedule: {self.schedule}",
            f"needs: {self.gpus_needed} GPU(s), ~{self.gpu_mem_gib:.0f} GiB each (estimate)",
            f"command: {self.command}",
        ]
        if self.gpu_mem_gib > 80:
            lines.append(
                "note: above an 80 GB GPU at this batch per process: raise num_processes or "
                "lower batch_size (activation checkpointing / gradient accumulation: not yet)"
            )
        lines += [f"problem: {p}" for p in self.problems]
        return "\n".join(lines)


def preset_for_depth(preset: str, depth: int | None) -> str:
    """``-p depth 30`` on the default smoke preset means CART-d30 (cart-d30-256), not a smoke
    run with 30 blocks: a depth with a paper preset selects that preset."""
    if depth in DEPTH_PRESETS and preset == "smoke":
        return f"cart-d{depth}-256"
    return preset


def estimate_gpu_memory(cfg: RunConfig, n_params: int, seq_len: int) -> float:
    """Rough peak GiB per GPU: fp32 weights + grads + AdamW moments (16 B/param, sharded by
    FSDP over the processes beyond 1B parameters) plus the activations of the local batch kept
    for backward, ~34 bytes per token, width unit and layer in bf16 with flash attention
    (Korthikanti et al. 2022), without activation checkpointing."""
    procs = max(1, cfg.num_processes)
    state = 16 * n_params / (procs if n_params > 1e9 else 1)
    width = cfg.ar.model_width
    local_batch = max(1, cfg.ar.batch_size // procs)
    acts = 34 * local_batch * seq_len * width * cfg.ar.depth
    return (state + acts) / 2**30


def full_scale(cfg: RunConfig) -> bool:
    return cfg.ar.depth >= FULL_SCALE_DEPTH or cfg.data.resolution >= FULL_SCALE_RESOLUTION


def command_for(config_path: Path | str, run_dir: Path | str, cfg: RunConfig, stage="train-ar"):
    args = [
        "accelerate",
        "launch",
        "--num_processes",
        str(cfg.num_processes),
        "--mixed_precision",
        cfg.mixed_precision,
        "-m",
        "cartlib",
        stage,
        "--config",
        str(config_path),
        "--run-dir",
        str(run_dir),
    ]
    return shlex.join(args)


def _num_classes(cfg: RunConfig) -> int:
    """The dataset's class count when it can be read here, else ImageNet's 1000. An image folder
    is counted by its class folders: planning must not open every validation image."""
    try:
        if cfg.data.dataset == "imagefolder":
            return imagefolder_num_classes(cfg.data.root or os.environ["CART_DATA_DIR"])
        return load_dataset_from_config(cfg.data, "test", progress=False).num_classes
    except Exception:  # not on this machine: planning must still work
        return 1000


def plan_ar(cfg: RunConfig, run_dir: str | Path) -> Plan:
    """Validate ``cfg`` completely and decide where its transformer training runs."""
    schedule = cfg.schedule()
    model = build_model(cfg, schedule, _num_classes(cfg), device="meta")
    n_params = model.num_params()
    mem = estimate_gpu_memory(cfg, n_params, schedule.seq_len)
    problems = []
    if cfg.data.dataset == "imagefolder" and not cfg.data.root:
        problems.append(
            "data.root is not set: point it at an ImageNet folder in ImageFolder layout "
            "(papermill -p data_root /path/to/imagenet)"
        )
    elif cfg.data.root and not Path(cfg.data.root).expanduser().exists():
        problems.append(f"data.root={cfg.data.root!r} does not exist on this machine")
    gpus = torch.cuda.device_count()
    need = cfg.num_processes if full_scale(cfg) else 0
    if full_scale(cfg) and gpus < 1:
        problems.append(
            f"this is a full-scale run ({n_params / 1e6:.0f}M parameters, "
            f"{cfg.data.resolution}px): it needs CUDA GPUs (the paper used 16 A100s; this preset "
            f"asks for {cfg.num_processes} processes) and this machine has none"
        )
    elif full_scale(cfg) and gpus < cfg.num_processes:
        problems.append(
            f"num_processes={cfg.num_processes} but only {gpus} GPU(s) here: pass "
            f"-p num_processes {gpus} (and a smaller batch_size if memory is short)"
        )
    config_path = Path(run_dir) / "launch-config.yaml"
    mode = "explain" if problems else ("launch" if full_scale(cfg) else "in-process")
    return Plan(
        mode,
        n_params,
        schedule.seq_len,
        schedule.describe(),
        need,
        mem,
        command_for(config_path, run_dir, cfg),
        problems,
    )


def launch(plan: Plan, cfg: RunConfig, run_dir: str | Path) -> int:
    """Write the config and run ``plan.command``, streaming its output; returns the exit code."""
    save_config(cfg, Path(run_dir) / "launch-config.yaml")
    print(f"$ {plan.command}", flush=True)
    proc = subprocess.Popen(
        shlex.split(plan.command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    for line in proc.stdout:
        sys.stdout.write(line)
    return proc.wait()


def explain(plan: Plan) -> None:
    """Print why ``plan`` cannot train here and how to run it elsewhere."""
    print("Not training here. What it needs:\n- " + "\n- ".join(plan.problems))
    print(f"\nOn a machine that has it:\n  {plan.command}", flush=True)


def explain_and_stop(plan: Plan) -> None:
    """:func:`explain`, then raise :class:`NothingTrainedError` so that the notebook run
    (papermill) fails instead of reporting success for a run that trained nothing."""
    explain(plan)
    raise NothingTrainedError(
        f"nothing was trained ({len(plan.problems)} problem(s), printed above): "
        + "; ".join(plan.problems)
    )
