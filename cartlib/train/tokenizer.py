"""Tokenizer training (notebook 02): data with cached bases, the compound-loss loop, loading."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast
from tqdm.auto import tqdm

from cartlib.config import save_config
from cartlib.data import load_dataset_from_config
from cartlib.decompose.cache import DecomposedDataset
from cartlib.perceptual import lpips_model
from cartlib.tokenizer import Tokenizer
from cartlib.tokenizer.losses import CompoundLoss
from cartlib.train.loop import (
    StepBatches,
    build_optimizer,
    load_stage,
    lr_lambda,
    make_accelerator,
    run_loop,
)


# ------------------------------------------------------------------------------------ tokenizer
def materialize(dataset, progress: bool = True, batch_size: int = 512) -> tuple[torch.Tensor, ...]:
    """Stack a (small) dataset into in-memory tensors: images as float16, bases too, labels int64.

    Smoke and tiny runs fit easily (20k x 4 x 3 x 32 x 32 halves = 250 MB) and then need no
    DataLoader workers, which is also what makes every step's batch cheap and exactly
    reproducible."""
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
    decomposition cache when the quantizer is base-detail (computed once, then reused). The
    intrinsic and specular decompositions are cheap closed forms: the tokenizer computes them per
    batch (bases None)."""
    ds = load_dataset_from_config(cfg.data, split)
    if cfg.order == 0 or cfg.decompose.kind != "base_detail":
        images, labels = materialize(ds, progress)
        return images, None, labels
    d = cfg.decompose
    with PartialState().main_process_first():  # under a launcher: decomposed once, then loaded
        dds = DecomposedDataset(
            ds, order=cfg.order, alpha=d.alpha, lam=d.lam, eps=d.eps, progress=progress
        )
    return materialize(dds, progress)


def tokenizer_dir(run_dir: str | Path, cfg) -> Path:
    """``tokenizer-<quantizer>-o<order>-<hash of its settings>``: one folder per distinct
    tokenizer, so notebooks can compare several and a changed setting never reuses a stale one."""
    key = cfg.digest(cfg.tokenizer_sections())
    return Path(run_dir) / f"tokenizer-{cfg.tokenizer.quantizer}-o{cfg.order}-{key}"


def train_tokenizer(
    cfg, run_dir: str | Path, progress: bool = True, stop_after: int | None = None, data=None
):
    """Train the VQ-VAE tokenizer of ``cfg`` (a RunConfig) with the compound loss (Eq. 2).

    Returns ``(tokenizer, history)``; checkpoints and ``history.json`` go to
    ``tokenizer_dir(run_dir, cfg)``. ``data`` = (images, bases, labels) skips loading."""
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
            loss, logs = crit.generator_loss(out, out.target, out.target_base, step)
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        acc.clip_grad_norm_(tok.parameters(), 1.0)
        opt.step()
        sch.step()
        if crit.gan_on(step):
            with acc.autocast():
                d_loss = crit.discriminator_loss(out.recon.float(), out.target)
            opt_d.zero_grad(set_to_none=True)
            acc.backward(d_loss)
            opt_d.step()
            logs["gan_d"] = d_loss.item()
        if t.dead_code_every and (step + 1) % t.dead_code_every == 0:
            logs["used_codes"] = float((quant.usage > 0).sum())
            logs["restarted"] = float(quant.restart_dead_codes())
            if acc.num_processes > 1:
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
    how = "notebook 02, or cartlib.runs.ensure_tokenizer(cfg, run_dir)"
    cfg, state = load_stage(path, "tokenizer", how)
    tok = Tokenizer(cfg.tokenizer, cfg.decompose, cfg.data.resolution)
    tok.load_state_dict(state)
    return tok.eval()
