"""Training loops for the tokenizer and the next-detail transformer, on accelerate.

One loop (:func:`run_loop`) serves both: in-process on a CPU for smoke runs, and unchanged under
``accelerate launch -m cartlib train-ar ...`` on GPUs. It gives

* exact resume: the batch of step s is a pure function of (seed, s) (:class:`StepBatches`) and
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
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cartlib.runs import atomic_torch_save, atomic_write_bytes

CKPT_NAME = "last.pt"


# ------------------------------------------------------------------------------------- accelerate
def make_accelerator(mixed_precision: str = "no", cpu: bool | None = None):
    """An ``accelerate.Accelerator``; in-process (no launcher) its global state is reset first so
    a notebook can train several models with different precision settings."""
    import os

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

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


# ------------------------------------------------------------------------------------------ data
class StepBatches:
    """Deterministic batches: step s takes items ``perm_e[i:i+B]`` of the epoch-e permutation, all
    derived from ``seed`` — so any step's batch is known without replaying the ones before it.

    ``fetch(indices)`` returns a batch (a tuple of tensors). Under several processes each takes its
    own slice of the global batch."""

    def __init__(self, n_items: int, batch_size: int, seed: int, fetch, rank=0, world=1):
        if n_items < batch_size:
            raise ValueError(
                f"batch_size={batch_size} is larger than the {n_items} training items; "
                "lower batch_size or use more data (data.train_limit)"
            )
        self.n, self.bs, self.seed, self.fetch = n_items, batch_size, seed, fetch
        self.rank, self.world = rank, world
        self._perm_epoch, self._perm = -1, None

    def indices(self, step: int) -> torch.Tensor:
        per_epoch = self.n // self.bs
        epoch, i = divmod(step, per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        idx = self._perm[i * self.bs : (i + 1) * self.bs]
        return idx[self.rank :: self.world]

    def __call__(self, step: int):
        return self.fetch(self.indices(step))


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


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load with a clear error for a truncated or foreign file (nothing is overwritten)."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, pickle garbage, ...
        raise RuntimeError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it is incomplete or not "
            "a cartlib checkpoint. Move it away to start this stage afresh, or restore a copy"
        ) from e


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
    from tqdm.auto import tqdm

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
        bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "rec", "acc")})
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


# ------------------------------------------------------------------------------------ tokenizer
def materialize(dataset, progress: bool = True, batch_size: int = 512) -> tuple[torch.Tensor, ...]:
    """Stack a (small) dataset into in-memory tensors: images as float16, bases too, labels int64.

    Smoke and tiny runs fit easily (20k x 4 x 3 x 32 x 32 halves = 250 MB) and then need no
    DataLoader workers, which is also what makes every step's batch cheap and exactly
    reproducible."""
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    cols: list[list[torch.Tensor]] = []
    for batch in tqdm(loader, desc="loading data", disable=not progress, leave=False):
        for i, t in enumerate(batch):
            if len(cols) <= i:
                cols.append([])
            cols[i].append(t.half() if t.is_floating_point() else t.long())
    return tuple(torch.cat(c) for c in cols)


def tokenizer_training_data(cfg, split: str = "train", progress: bool = True):
    """(images, bases or None, labels) tensors for ``cfg``: bases B_1..B_n from the on-disk
    decomposition cache when the quantizer is base-detail (computed once, then reused)."""
    from cartlib.data import load_dataset_from_config

    ds = load_dataset_from_config(cfg.data, split)
    order = cfg.decompose.order if cfg.tokenizer.quantizer == "base_detail" else 0
    if order == 0:
        images, labels = materialize(ds, progress)
        return images, None, labels
    from accelerate import PartialState

    from cartlib.decompose.cache import DecomposedDataset

    d = cfg.decompose
    with PartialState().main_process_first():  # under a launcher: decomposed once, then loaded
        dds = DecomposedDataset(
            ds, order=order, alpha=d.alpha, lam=d.lam, eps=d.eps, progress=progress
        )
    return materialize(dds, progress)


def tokenizer_dir(run_dir: str | Path, cfg) -> Path:
    """``tokenizer-<quantizer>-o<order>-<hash of its settings>``: one folder per distinct
    tokenizer, so notebooks can compare several and a changed setting never reuses a stale one."""
    from cartlib.runs import config_hash, tokenizer_sections

    t = cfg.tokenizer
    order = cfg.decompose.order if t.quantizer == "base_detail" else 0
    return (
        Path(run_dir)
        / f"tokenizer-{t.quantizer}-o{order}-{config_hash(cfg, tokenizer_sections(cfg))}"
    )


def train_tokenizer(
    cfg, run_dir: str | Path, progress: bool = True, stop_after: int | None = None, data=None
):
    """Train the VQ-VAE tokenizer of ``cfg`` (a RunConfig) with the compound loss (Eq. 2).

    Returns ``(tokenizer, history)``; checkpoints and ``history.json`` go to
    ``tokenizer_dir(run_dir, cfg)``. ``data`` = (images, bases, labels) skips loading."""
    from cartlib.config import save_config
    from cartlib.tokenizer import Tokenizer
    from cartlib.tokenizer.losses import CompoundLoss

    t = cfg.tokenizer
    out_dir = tokenizer_dir(run_dir, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    torch.manual_seed(t.seed)
    acc = make_accelerator(cfg.mixed_precision)
    images, bases, _ = data if data is not None else tokenizer_training_data(cfg, "train", progress)
    tok = Tokenizer(t, cfg.decompose, cfg.data.resolution)
    perceptual = None
    if t.w_lpips > 0:
        from cartlib.perceptual import lpips_model

        perceptual = lpips_model(check_range=False)  # reconstructions may leave [0,1]
    crit = CompoundLoss(t, perceptual)
    opt = build_optimizer(tok.parameters(), t.lr, 0.0, betas=(0.5, 0.9))
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(min(50, t.steps // 10), t.steps))
    modules, optimizers, schedulers = {"tokenizer": tok}, {"opt": opt}, {"sched": sch}
    if crit.disc is not None:
        opt_d = build_optimizer(crit.disc.parameters(), t.lr, 0.0, betas=(0.5, 0.9))
        modules["disc"], optimizers["opt_d"] = crit.disc, opt_d
    tok, opt = acc.prepare(tok, opt)
    if crit.disc is not None:
        crit.disc, opt_d = acc.prepare(crit.disc, opt_d)
        modules["disc"] = crit.disc
    if perceptual is not None:
        perceptual.to(acc.device)
    modules["tokenizer"] = tok
    optimizers["opt"] = opt

    def fetch(idx):
        x = images[idx].float().to(acc.device)
        b = bases[idx].float().to(acc.device) if bases is not None else None
        return x, b

    batches = StepBatches(
        len(images), t.batch_size, t.seed, fetch, acc.process_index, acc.num_processes
    )
    quant = acc.unwrap_model(tok).quantizer

    def step_fn(step: int) -> dict[str, float]:
        x, b = batches(step)
        tok.train()
        with acc.autocast():
            out = tok(x, b)
            loss, logs = crit.generator_loss(out, x, None if b is None else b[:, -1], step)
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        acc.clip_grad_norm_(tok.parameters(), 1.0)
        opt.step()
        sch.step()
        if crit.gan_on(step):
            with acc.autocast():
                d_loss = crit.discriminator_loss(out.recon.float(), x)
            opt_d.zero_grad(set_to_none=True)
            acc.backward(d_loss)
            opt_d.step()
            logs["gan_d"] = d_loss.item()
        if t.dead_code_every and (step + 1) % t.dead_code_every == 0:
            logs["used_codes"] = float((quant.usage > 0).sum())
            logs["restarted"] = float(quant.restart_dead_codes())
            if acc.num_processes > 1:
                from accelerate.utils import broadcast

                broadcast(quant.codebook.weight.data, from_process=0)
        return logs

    history = run_loop(
        accelerator=acc,
        modules=modules,
        optimizers=optimizers,
        schedulers=schedulers,
        step_fn=step_fn,
        total_steps=t.steps,
        ckpt_dir=out_dir,
        ckpt_every=t.ckpt_every,
        stop_after=stop_after,
        progress=progress,
        desc=f"tokenizer ({t.quantizer})",
    )
    tok = acc.unwrap_model(tok).eval()
    return tok, history


def load_tokenizer(path: str | Path):
    """A trained Tokenizer from its folder (config.yaml + last.pt), in eval mode."""
    from cartlib.config import load_config
    from cartlib.tokenizer import Tokenizer

    path = Path(path)
    for need in ("config.yaml", CKPT_NAME):
        if not (path / need).exists():
            raise FileNotFoundError(
                f"{path / need} is missing: train the tokenizer first (notebook 02, or "
                "cartlib.runs.ensure_tokenizer(cfg, run_dir))"
            )
    cfg = load_config(path / "config.yaml")
    tok = Tokenizer(cfg.tokenizer, cfg.decompose, cfg.data.resolution)
    tok.load_state_dict(load_checkpoint(path / CKPT_NAME)["modules"]["tokenizer"])
    return tok.eval()


# ------------------------------------------------------------------------------- next-detail AR
@torch.no_grad()
def extract_tokens(tokenizer, images, bases=None, batch_size: int = 256, progress=True):
    """Alg. 1 over a whole (in-memory) dataset. -> list of M int16 tensors (N, h_k, w_k)."""
    from tqdm.auto import tqdm

    device = next(tokenizer.parameters()).device
    cols: list[list[torch.Tensor]] = [[] for _ in tokenizer.schedule]
    for i in tqdm(range(0, len(images), batch_size), desc="tokenizing", disable=not progress):
        x = images[i : i + batch_size].float().to(device)
        b = bases[i : i + batch_size].float().to(device) if bases is not None else None
        for col, r in zip(cols, tokenizer.encode(x, b)):
            col.append(
                r.to(
                    torch.int16 if tokenizer.quantizer.codebook_size < 2**15 else torch.int32
                ).cpu()
            )
    return [torch.cat(c) for c in cols]


def ar_loss(logits: torch.Tensor, targets: torch.Tensor, level_ids: torch.Tensor, n_steps: int):
    """Cross-entropy over all token maps, plus per-step loss and accuracy (for the logs).
    logits (B,L,V), targets (B,L) -> (loss, per-step loss (M,), per-step acc (M,))"""
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    hit = (logits.argmax(-1) == targets).float()
    count = torch.bincount(level_ids, minlength=n_steps).float() * len(targets)
    per_loss = torch.zeros(n_steps, device=ce.device).index_add_(0, level_ids, ce.sum(0)) / count
    per_acc = torch.zeros(n_steps, device=ce.device).index_add_(0, level_ids, hit.sum(0)) / count
    return ce.mean(), per_loss.detach(), per_acc.detach()


def ar_dir(run_dir: str | Path, cfg) -> Path:
    """``ar-d<depth>-<quantizer>-o<order>-<hash>``: keyed by everything the transformer sees."""
    from cartlib.runs import config_hash, tokenizer_sections

    t = cfg.tokenizer
    order = cfg.decompose.order if t.quantizer == "base_detail" else 0
    h = config_hash(cfg, (*tokenizer_sections(cfg), "ar"))
    return Path(run_dir) / f"ar-d{cfg.ar.depth}-{t.quantizer}-o{order}-{h}"


def train_ar(
    cfg,
    run_dir,
    tokenizer,
    tokens,
    labels,
    num_classes: int,
    progress=True,
    stop_after: int | None = None,
):
    """Train the next-detail transformer on pre-extracted ``tokens`` (list of (N,h_k,w_k)) and
    ``labels`` (N,). AdamW (0.9, 0.95), lr = ar.lr x batch / 256 (VAR's scaling), warm-up then
    cosine decay, gradient clipping, label dropout for classifier-free guidance."""
    from cartlib.config import save_config
    from cartlib.model import build_model

    a = cfg.ar
    out_dir = ar_dir(run_dir, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    (out_dir / "num_classes.txt").write_text(str(num_classes))
    torch.manual_seed(a.seed)
    acc = make_accelerator(cfg.mixed_precision)
    tokenizer = tokenizer.to(acc.device).eval().requires_grad_(False)
    sched = tokenizer.schedule
    model = build_model(cfg, sched, num_classes)
    lr = a.lr * a.batch_size / 256
    opt = build_optimizer(model.parameters(), lr, a.weight_decay)
    lrs = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(a.warmup, a.steps))
    model, opt = acc.prepare(model, opt)
    core = acc.unwrap_model(model)
    flat = torch.cat([t.flatten(1) for t in tokens], 1)  # (N, L)

    def fetch(idx):
        return flat[idx].long().to(acc.device), labels[idx].to(acc.device)

    batches = StepBatches(
        len(flat), a.batch_size, a.seed, fetch, acc.process_index, acc.num_processes
    )

    def step_fn(step: int) -> dict[str, float]:
        x, y = batches(step)
        maps = [x[:, sched.step_slice(m)].view(-1, s.h, s.w) for m, s in enumerate(sched)]
        with torch.no_grad():
            inputs = tokenizer.quantizer.teacher_inputs(maps)
        drop = torch.rand(len(y), device=y.device) < a.cond_drop
        y = torch.where(drop, torch.full_like(y, num_classes), y)
        model.train()
        with acc.autocast():
            logits = model(y, inputs)
        loss, per_loss, per_acc = ar_loss(logits, x, core.level_ids, sched.n_steps)
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        gnorm = acc.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        lrs.step()
        logs = {"loss": loss.item(), "acc": float(per_acc.mean()), "grad_norm": float(gnorm)}
        logs.update({f"loss_{m}": float(v) for m, v in enumerate(per_loss)})
        logs.update({f"acc_{m}": float(v) for m, v in enumerate(per_acc)})
        return logs

    history = run_loop(
        accelerator=acc,
        modules={"model": model},
        optimizers={"opt": opt},
        schedulers={"sched": lrs},
        step_fn=step_fn,
        total_steps=a.steps,
        ckpt_dir=out_dir,
        ckpt_every=a.ckpt_every,
        stop_after=stop_after,
        progress=progress,
        desc=f"next-detail AR d{a.depth}",
    )
    return core.eval(), history


def load_ar(path: str | Path, tokenizer):
    """A trained transformer from its folder (config.yaml + last.pt), in eval mode."""
    from cartlib.config import load_config
    from cartlib.model import build_model

    path = Path(path)
    for need in ("config.yaml", CKPT_NAME, "num_classes.txt"):
        if not (path / need).exists():
            raise FileNotFoundError(
                f"{path / need} is missing: train the transformer first (notebook 04, or "
                "cartlib.runs.ensure_ar(cfg, run_dir))"
            )
    cfg = load_config(path / "config.yaml")
    model = build_model(cfg, tokenizer.schedule, int((path / "num_classes.txt").read_text()))
    model.load_state_dict(load_checkpoint(path / CKPT_NAME)["modules"]["model"])
    return model.eval()
