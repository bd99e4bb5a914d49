"""The training loop shared by the tokenizer and the next-detail transformer, on accelerate.

One loop (:func:`run_loop`) serves both: in-process on a CPU for smoke runs, and unchanged under
``accelerate launch -m cartlib train-ar ...`` on GPUs. It gives

* exact resume: the batch of step s is a pure function of (seed, s) (:class:`StepSampler`) and
  the checkpoint holds model, optimizer, scheduler and RNG states, so a run killed after step s and
  resumed computes the same step s+1 as one that never stopped;
* checkpoints every ``ckpt_every`` steps and at the end, the last two kept with their sha256
  (:mod:`cartlib.train.checkpoints`): a corrupt newest one is skipped with a warning; under FSDP
  every rank writes its shard (:mod:`cartlib.train.sharded`) and the last save of a run also
  writes the whole weights into the checkpoint file (the consolidated export);
* one writer per stage folder: the main process holds its lock (:func:`cartlib.io.dir_lock`)
  from resume to the last save, so a second process training the same stage waits for it (and
  then resumes the finished checkpoint) instead of interleaving its saves;
* a clear error on a non-finite loss that names the step and the last good checkpoint, and no
  checkpoint of weights that are not finite or that the update before it blew up (the norm of a
  module multiplied more than :data:`MAX_GROWTH`-fold in one step): the last update of a run
  included, which no loss ever sees;
* loss curves in ``<dir>/history.json`` and a tqdm progress bar (``progress=False`` in tests).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from cartlib import hardware
from cartlib.cluster import stage_command
from cartlib.config import STAGE_FOLDER, ConfigError, load_config
from cartlib.io import (  # noqa: F401 (load_checkpoint re-exported)
    DIST_TIMEOUT,
    atomic_write_bytes,
    dir_lock,
    load_checkpoint,
)
from cartlib.train.checkpoints import (
    CKPT_NAME,
    HISTORY,
    KEEP,
    NotNewest,
    load_latest,
    save_checkpoint,
)
from cartlib.train.sharded import (
    is_sharded,
    load_shards,
    rank_world,
    save_shards,
    whole_state_dicts,
)
from cartlib.train.stopping import Interrupted, deferred_interrupt


# ------------------------------------------------------------------------------------- accelerate
def make_accelerator(mixed_precision: str = "no", cpu: bool | None = None, fsdp: bool = False):
    """An ``accelerate.Accelerator`` on :func:`cartlib.hardware.device` (``cpu`` overrides) in
    ``mixed_precision`` (``auto``: :func:`cartlib.hardware.resolve_precision`); in-process (no
    launcher) its global state is reset first so a notebook can train several models with
    different precision settings. Collectives wait up to :data:`cartlib.io.DIST_TIMEOUT`.
    ``fsdp``: the caller shards the model itself (:func:`cartlib.train.parallel.shard_per_block`,
    the same on CPUs and GPUs), which needs several launched processes.

    A model it prepares over several processes is wrapped in DDP with the gradients as views of
    DDP's flat bucket (``gradient_as_bucket_view``: one fp32 copy of the gradients instead of
    two, :mod:`cartlib.fit`) and without broadcasting buffers from rank 0 at every forward
    (``broadcast_buffers=False``): the transformer's buffers (mask, level ids, the key-bias
    switch) are constants every process builds alike, and the tokenizer's code-usage counts are
    per process by design (summed across processes when dead codes are restarted)."""
    import warnings

    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    mixed_precision = hardware.precision(mixed_precision)  # auto -> what the device runs natively
    if cpu is None:
        cpu = hardware.device().type == "cpu"
    if "LOCAL_RANK" not in os.environ and "ACCELERATE_MIXED_PRECISION" not in os.environ:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    elif AcceleratorState._shared_state.get("_mixed_precision") not in (None, mixed_precision):
        # a launched process training a second model in another precision (accelerate would
        # refuse): a new precision state, the process group (PartialState) kept
        AcceleratorState._reset_state(False)
        GradientState._reset_state()
    if cpu and mixed_precision == "fp16":
        raise ValueError("mixed_precision='fp16' needs a GPU; use 'bf16' on CPUs")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if fsdp and world < 2:
        raise ValueError(
            f"ar.fsdp=True shards the model over launched processes, and this is {world} "
            "process: launch 2 or more (accelerate launch --multi_gpu --num_processes N; "
            "tests/launching.py shows it on CPUs), or set ar.fsdp=False (gradient accumulation "
            "via ar.micro_batch also saves memory)"
        )
    timeout = InitProcessGroupKwargs(timeout=DIST_TIMEOUT)
    ddp = DistributedDataParallelKwargs(gradient_as_bucket_view=True, broadcast_buffers=False)
    # torch 2.14 names broadcast_buffers deprecated in favour of forward_sync_buffers, which
    # accelerate 1.16 cannot pass; torch's own message keeps broadcast_buffers=False for buffers
    # that are per process, as the tokenizer's usage counts are
    warnings.filterwarnings("ignore", r"`broadcast_buffers` is deprecated", FutureWarning)
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision, kwargs_handlers=[timeout, ddp])


# ------------------------------------------------------------------------------------ checkpoints
def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (a checkpoint loads them with
    ``weights_only=True``: :mod:`cartlib.trust`)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },  # fmt: skip
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rng_states() -> list[dict[str, Any]] | None:
    """Collective under a launcher: every process's :func:`rng_state`, rank order (each draws
    its own DropPath masks, so each resumes its own stream); None in one process."""
    rank, world = rank_world()
    if world == 1:
        return None
    states = [None] * world
    dist.all_gather_object(states, rng_state())
    return states


def non_finite(modules: dict[str, nn.Module]) -> str:
    """Collective under a launcher: the first parameter of ``modules`` (unwrapped) holding a
    NaN or an infinity on any process ("module.name"), or "" when all are finite. A checkpoint
    is checked before it is written: the loss check before each update cannot see what the
    last update did."""
    found = ""
    for module_name, module in modules.items():
        for name, p in module.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            if not torch.isfinite(local.detach()).all():
                found = f"{module_name}.{name}"
                break
        if found:
            break
    rank, world = rank_world()
    if world > 1:
        names: list = [None] * world
        dist.all_gather_object(names, found)
        found = next((n for n in names if n), "")
    return found


# A module whose weight norm one update multiplies by more than this has exploded (a checkpoint
# of it is refused). One AdamW update moves each weight by about the learning rate; measured per
# step: x1.01 (tiny tokenizer, lr 3e-3), x1.02 at most (tiny transformers at lr 0.5, the layout
# tests' rate), x1e7 (tokenizer at lr 1e6, whose next loss is NaN).
MAX_GROWTH = 1e3


def weight_norms(modules: dict[str, nn.Module]) -> dict[str, float]:
    """Collective under FSDP: the L2 norm of each module's parameters (unwrapped), over all
    shards (fp32: an overflow reads as inf, which counts as exploded)."""
    norms = []
    for module in modules.values():
        sq = [
            torch.linalg.vector_norm((p.to_local() if isinstance(p, DTensor) else p).detach(),
                                     dtype=torch.float32) ** 2
            for p in module.parameters()
        ]  # fmt: skip
        norms.append(torch.stack(sq).sum() if sq else torch.zeros(()))
    device = next((n.device for n in norms if n.device.type != "cpu"), torch.device("cpu"))
    total = torch.stack([n.to(device) for n in norms])
    rank, world = rank_world()
    if world > 1 and is_sharded(*modules.values()):
        dist.all_reduce(total)  # each rank holds a shard of every sharded parameter
    return dict(zip(modules, total.sqrt().tolist(), strict=True))


def exploded(before: dict[str, float], after: dict[str, float]) -> str:
    """The first module whose weight norm grew more than :data:`MAX_GROWTH`-fold from ``before``
    to ``after`` ("name: norm a -> b"), or ""."""
    for name, b in before.items():
        a = after[name]
        if b > 0 and not a <= MAX_GROWTH * b:  # (a NaN norm counts too)
            return f"{name}: weight norm {b:.4g} -> {a:.4g}, x{a / b:.3g}"
    return ""


def resume_rng(state: dict[str, Any]) -> None:
    """Set this process's RNG from a checkpoint: its own stream when the checkpoint was written
    by as many processes (``rng_ranks``), else the main process's (one process, or a run resumed
    at another process count: the streams then differ from an uninterrupted run's)."""
    rank, world = rank_world()
    ranks = state.get("rng_ranks")
    if ranks is not None and len(ranks) == world:
        set_rng_state(ranks[rank])
        return
    set_rng_state(state["rng"])
    if rank:  # not the main process's masks again
        torch.manual_seed(int(torch.randint(2**62, (1,))) + rank)


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    if isinstance(n, dict):  # else the tuple of np.random.get_state() (older checkpoints)
        key = n["key"].numpy().astype(np.uint32)
        n = (n["kind"], key, n["pos"], n["has_gauss"], n["gauss"])
    np.random.set_state(n)
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------ loop
def lr_lambda(
    warmup: int, total: int, final: float = 0.1, schedule: str = "cosine"
) -> Callable[[int], float]:
    """Learning-rate factor of step s: linear warm-up over ``warmup`` steps, then

    * ``cosine``: cosine decay to ``final`` x the base rate at ``total``;
    * ``lin0`` (VAR's default ``sche``, utils/lr_control.py): flat for the first 5% of the
      steps after warm-up, then linear to ``final`` at the last step (VAR's ``wpe``)."""
    if schedule not in ("cosine", "lin0"):
        raise ValueError(f"lr_schedule={schedule!r}: choose 'cosine' or 'lin0' (VAR)")

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "lin0":
            t = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
            return 1.0 if t < 0.05 else final + (1 - final) * (1 - t) / 0.95
        t = (step - warmup) / max(1, total - warmup)
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def _latest(ckpt_dir: Path, main: bool):
    """:func:`load_latest` (shards checked) on the main process; under a launcher the others
    read the checkpoint it chose, so all resume from the same one and the shards are hashed
    once."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return load_latest(ckpt_dir, shards=True)
    found, choice = None, [None]
    if main:
        try:
            found = load_latest(ckpt_dir, shards=True)
            choice = [found and found[1]]
        except RuntimeError as e:
            choice = [e]
    dist.broadcast_object_list(choice, src=0)
    if isinstance(choice[0], Exception):
        raise choice[0]
    if main or choice[0] is None:
        return found
    return load_checkpoint(choice[0]), choice[0]


def _resume(ckpt_dir: Path, accelerator, modules, optimizers, schedulers):
    """(start step, history) after loading the newest usable checkpoint of ``ckpt_dir``;
    ``modules`` unwrapped."""
    found = _latest(ckpt_dir, accelerator.is_main_process)
    if found is None:
        return 0, []
    state, path = found
    if "sharded" in state:
        load_shards(path.parent / state["sharded"], modules, optimizers)
    elif is_sharded(*modules.values()):
        raise ValueError(
            f"{path} was written without FSDP and this run shards the model: resume it with "
            f"ar.fsdp=False, or move {ckpt_dir} away to start afresh under FSDP"
        )
    else:
        for name, mod in modules.items():
            mod.load_state_dict(state["modules"][name])
        for name, opt in optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
    for name, sch in schedulers.items():
        sch.load_state_dict(state["schedulers"][name])
    resume_rng(state)
    return state["step"], state["history"]


def weight_decay_at(step: int, total: int, start: float, end: float | None) -> float:
    """VAR's weight-decay schedule: cosine from ``start`` at step 0 to ``end`` at the last step
    (``end`` None = constant ``start``)."""
    if end is None:
        return start
    t = min(1.0, step / max(1, total - 1))
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


def set_weight_decay(optimizer: torch.optim.Optimizer, value: float) -> None:
    """Set every group's weight decay to ``value`` x its ``wd_scale`` (0 for exempt groups)."""
    for group in optimizer.param_groups:
        group["weight_decay"] = value * group.get("wd_scale", float(group["weight_decay"] > 0))


# Entries a run's loss history keeps (it is in every checkpoint and in history.json): up to this
# many steps one entry per step, beyond it one per ceil(steps / MAX_HISTORY) steps, their mean.
MAX_HISTORY = 10_000


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
    keep: int = KEEP,
    loss_limit: float | None = None,
    after_update: Callable[[], dict[str, float]] | None = None,
    notes: dict[str, str] | None = None,
) -> list[dict[str, float]]:
    """Run ``step_fn(step)`` for steps [resume point, total_steps); return the loss history
    (one entry per step, or per interval beyond :data:`MAX_HISTORY` steps).

    ``stop_after`` ends the loop early after that many steps (checkpointing first): used to
    simulate a kill in tests and to train in slices from a notebook. ``keep`` checkpoints are
    kept. A step whose ``loss`` is not finite or above ``loss_limit`` (a run that diverged) stops
    the run, naming the last good checkpoint; ``after_update()`` (collective) gives the logs of
    the last step's batch under the updated weights, checked the same way before a checkpoint
    is written: the last update of a run is otherwise never seen by a loss. The main process
    says in one line whether it resumed (from which step) or starts anew, with ``notes``
    (:func:`cartlib.train.checkpoints.start_notes`)."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / CKPT_NAME
    main = accelerator.is_main_process
    cores = {n: accelerator.unwrap_model(m) for n, m in modules.items()}
    sharded = is_sharded(*cores.values())
    with dir_lock(ckpt_dir, f"training {desc}") if main else contextlib.nullcontext():
        accelerator.wait_for_everyone()  # the others resume once the main process holds the lock
        start, history = _resume(ckpt_dir, accelerator, cores, optimizers, schedulers)
        end = total_steps if stop_after is None else min(total_steps, start + stop_after)
        if main and start < total_steps:
            print(_start_line(desc, ckpt_dir, start, total_steps, notes or {}), flush=True)
        # nothing to train and nothing saved (steps: 0): one checkpoint all the same. Decided
        # before the loop, as every process must agree (saving is collective) and the main
        # process's last save may be on disk before another process looks
        save_empty = end == start and not path.exists()

        def save(
            step: int, before: dict[str, float] | None = None, last_update: bool = False
        ) -> None:
            """The checkpoint of ``step``: one file from the main process, plus every rank's
            shards under FSDP (then whole weights in the file only at this run's last save).
            The weights are checked first (collectives): finite, and, given the norms
            ``before`` the last update, not exploded by it (the loss check before each update
            never sees what the last one did)."""
            what, bad = "not finite", non_finite(cores)
            if not bad and before is not None:
                bad = exploded(before, weight_norms(cores))
                what = f"exploded (the last update grew them over {MAX_GROWTH:g}-fold)"
            if not bad and (before is not None or last_update) and after_update is not None:
                bad = diverged(after_update())
                what = "broken by the last update (the loss of its batch under them)"
            if bad:
                last = f"the last good checkpoint is {path}" if path.exists() else (
                    "no checkpoint was written yet")  # fmt: skip
                raise FloatingPointError(
                    f"{desc}: the weights are {what} after step {step} ({bad}); nothing was "
                    f"saved and {last}. Lower the learning rate, set mixed_precision='no', or "
                    "check the input data for NaNs"
                )
            state, shards = {"step": step}, None
            ranks = rng_states()  # collective: every process's RNG
            if sharded:
                state["sharded"], shards = save_shards(ckpt_dir, step, cores, optimizers)
                if step == end:  # the consolidated export (collective)
                    state["modules"] = whole_state_dicts(cores)
            elif main:
                state["modules"] = {n: m.state_dict() for n, m in cores.items()}
                state["optimizers"] = {n: o.state_dict() for n, o in optimizers.items()}
            if main:
                state["schedulers"] = {n: s.state_dict() for n, s in schedulers.items()}
                state.update(rng=rng_state(), history=history)
                if ranks is not None:
                    state["rng_ranks"] = ranks
                state.update(extra_state() if extra_state else {})
                save_checkpoint(ckpt_dir, state, keep, shards)
                atomic_write_bytes(ckpt_dir / HISTORY, json.dumps(history).encode())
            if sharded:
                accelerator.wait_for_everyone()  # the manifest lists it before anyone goes on

        def diverged(logs: dict[str, float], step: int | None = None) -> str:
            """Why ``logs`` (of ``step``) say the run broke (a non-finite value, a loss above
            the limit), or ""."""
            at = "" if step is None else f" at step {step}"
            bad = {k: v for k, v in logs.items() if not math.isfinite(v)}
            if bad:
                return f"non-finite loss{at}: {bad}"
            if loss_limit is not None and logs.get("loss", 0.0) > loss_limit:
                return f"diverged{at}: loss {logs['loss']:.4g}, above the limit {loss_limit:.4g}"
            return ""

        every = max(1, -(-total_steps // MAX_HISTORY))
        pending: list[dict[str, float]] = []

        def flush(step: int) -> None:
            """One history entry: the mean of the steps logged since the last one."""
            if pending:
                mean = {k: sum(p[k] for p in pending) / len(pending) for k in pending[-1]}
                history.append({"step": step, **mean})
                pending.clear()

        bar = tqdm(
            range(start, end),
            desc=desc,
            disable=not progress or not main,
            initial=start,
            total=total_steps,
            mininterval=1.0,  # a notebook widget update is an iopub message: keep them few (nbval)
        )
        with deferred_interrupt(enabled=rank_world()[1] == 1) as stop:
            for step in bar:
                saving = (step + 1) % ckpt_every == 0 or step + 1 == end
                before = weight_norms(cores) if saving else None  # what this step's update does
                logs = step_fn(step)
                bad = diverged(logs, step)
                if bad:
                    last = (
                        f"the last good checkpoint (step {start}) is {path}"
                        if path.exists()
                        else ("no checkpoint was written yet")
                    )
                    raise FloatingPointError(
                        f"{desc}: {bad}; {last}. Lower the learning rate, set "
                        "mixed_precision='no', or check the input data for NaNs"
                    )
                pending.append(logs)
                if (step + 1) % every == 0 or step + 1 == end:
                    flush(step)
                bar.set_postfix(
                    {k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "rec", "acc")},
                    refresh=False,
                )
                if saving:
                    flush(step)  # the checkpoint's history covers every step before it
                    save(step + 1, before)
                    start = step + 1
                if stop.requested:  # Ctrl-C during the step: it is finished; keep it
                    if start != step + 1:
                        flush(step)
                        save(step + 1, last_update=True)
                    raise Interrupted(
                        f"{desc}: interrupted after step {step + 1} of {total_steps}; saved "
                        f"{ckpt_dir / CKPT_NAME}. Run the same command (or cell) again to resume "
                        "from there"
                    )
        if save_empty:
            save(end)
    return history


def _start_line(desc: str, folder: Path, start: int, total: int, notes: dict[str, str]) -> str:
    """ "resuming ... from step s" or "starting ... at step 0", and why (see :func:`run_loop`)."""
    if start:
        layout = notes.get("layout")
        why = f"; laid out otherwise than before ({layout}): the same steps" if layout else ""
        return f"{desc}: resuming from step {start} of {total} in {folder}{why}"
    others = notes.get("others")
    why = f"; not resumed: {others}" if others else ""
    return f"{desc}: starting at step 0 of {total} in {folder}{why}"


# Parameters VAR exempts from weight decay by name (train.py's ``nowd_keys``): position, start
# and level embeddings, shared-adaLN offsets, attention scales. Class and word embeddings decay.
NO_DECAY_NAMES = frozenset({"pos_start", "pos_emb", "lvl_emb", "ada_gss", "scale_mul"})


def decays(name: str, p: torch.Tensor) -> bool:
    """Whether parameter ``name`` gets weight decay: not biases, norms/gains (1-D) or
    :data:`NO_DECAY_NAMES` (VAR's ``filter_params``)."""
    return p.ndim >= 2 and not name.endswith("bias") and NO_DECAY_NAMES.isdisjoint(name.split("."))


def build_optimizer(
    params, lr: float, weight_decay: float, betas=(0.9, 0.95), fused: bool | None = None
):
    """AdamW with two groups: decayed, and exempt (see :func:`decays`). ``params`` is a module
    (names known: VAR's rule) or an iterable of parameters (1-D ones exempt). Each group keeps
    its parameter ``names`` and a ``wd_scale`` (1 or 0) for :func:`set_weight_decay`.

    ``fused`` (None: when the parameters are on CUDA or this process trains there,
    :func:`cartlib.hardware.device`; they are often moved after the optimizer is built): torch's
    fused AdamW kernel, one launch per step and no temporaries (foreach, torch's CUDA default,
    keeps a second-moment-sized one: :mod:`cartlib.fit`). On the CPU torch's default, the
    per-tensor loop: the optimizer step is under 1 % of a CPU training step, and the fused CPU
    kernel rounds differently from the loop (docs/history.md 2026-12-07)."""
    named = list(
        params.named_parameters() if isinstance(params, nn.Module) else (("", p) for p in params)
    )
    if fused is None:
        on_cuda = any(p.is_cuda for _, p in named)
        fused = on_cuda or hardware.device().type == "cuda"
    groups = {True: {"params": [], "names": []}, False: {"params": [], "names": []}}
    for name, p in named:
        if p.requires_grad:
            g = groups[decays(name, p)]
            g["params"].append(p)
            g["names"].append(name)
    return torch.optim.AdamW(
        [
            {**groups[True], "weight_decay": weight_decay, "wd_scale": 1.0},
            {**groups[False], "weight_decay": 0.0, "wd_scale": 0.0},
        ],
        lr=lr,
        betas=betas,
        fused=fused or None,
    )


def check_stage_config(path: str | Path, cfg) -> None:
    """Refuse a stage folder whose ``config.yaml`` (read as ``cfg``) is not the one it was
    trained with: its settings must hash to the key the folder is named by (folders named
    otherwise, e.g. renamed by hand, are not checked). Building the model from edited settings
    fails with a size mismatch at best and loads into a different model at worst."""
    path = Path(path)
    named = STAGE_FOLDER.fullmatch(path.name)
    if named is None or cfg.artifact_key(named["stage"]) == named["key"]:
        return
    stage, config = named["stage"], path / "config.yaml"
    edited = path.parent / cfg.stage_folder(stage)
    copy = path.parent / f"{edited.name}.yaml"
    command = stage_command(cfg, f"train-{stage}", copy, path.parent)
    raise ConfigError(
        f"{config} is not the configuration the weights in {path} were trained with: its "
        f"settings hash to {cfg.artifact_key(stage)}, the folder's name says {named['key']}. "
        "It was edited after training (or the folder was renamed). Restore the file (from a "
        "copy, or undo the edit); to train with the edited settings instead, copy it out and "
        f"train them into their own folder ({edited.name}):\n  cp {config} {copy}\n  "
        f"(restore {config})\n  {command}"
    )


def load_stage(path: str | Path, module: str, how: str, extra: tuple[str, ...] = ()):
    """(config, state dict of ``module``) of a finished stage folder, read from its newest
    checkpoint (an unusable one is an error, not a fallback to an older model) with the
    config it was trained with (:func:`check_stage_config`); a missing file is an error that
    says how to produce it (``how``)."""
    path = Path(path)
    for need in ("config.yaml", *extra):
        if not (path / need).exists():
            raise FileNotFoundError(f"{path / need} is missing: train it first ({how})")
    cfg = load_config(path / "config.yaml")
    check_stage_config(path, cfg)
    try:
        found = load_latest(path, fallback=False)
    except NotNewest as e:
        raise NotNewest(
            f"{path} holds no finished model any more: {e}. Train the stage again to repair "
            f"it (it resumes from the older checkpoint: {how}), or restore the file"
        ) from None
    if found is None:
        raise FileNotFoundError(f"{path / CKPT_NAME} is missing: train it first ({how})")
    state, file = found
    if "modules" not in state:
        raise FileNotFoundError(
            f"{file} (step {state['step']}) holds its weights only as FSDP shards in "
            f"{path / state['sharded']}: the last save of a training run writes them whole; "
            f"resume the training to its end ({how})"
        )
    return cfg, state["modules"][module]
