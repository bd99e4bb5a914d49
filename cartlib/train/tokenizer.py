"""Tokenizer training (notebook 02): the streaming data path, the compound-loss loop, loading.

Training reads the dataset through :mod:`cartlib.data.stream` (lazy, augmented as
``data.mid_ratio/random_crop/hflip`` say, DataLoader workers, sharded over processes) and takes
the bases B_1..B_n from the switch ``data.cache_bases``: the on-disk cache (small datasets) or
the decomposition of each batch on the training device. ``data=(images, bases, labels)`` trains
on tensors held in memory instead (notebook 02 and the tests), with the same step sampler.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from accelerate.utils import broadcast

from cartlib import hardware
from cartlib.config import save_config
from cartlib.data.augment import centre
from cartlib.data.stream import Bases, StepSampler, StepStream, batches, source_for, stored_order
from cartlib.io import process_state
from cartlib.launch import plan_tokenizer
from cartlib.perceptual import lpips_model
from cartlib.tokenizer import Tokenizer
from cartlib.tokenizer.losses import CompoundLoss
from cartlib.tokenizer.var_layout import load_var_state_dict
from cartlib.train.checkpoints import clear_if_installed, save_checkpoint, start_notes
from cartlib.train.loop import (
    build_optimizer,
    load_stage,
    lr_lambda,
    make_accelerator,
    run_loop,
)

IN_MEMORY_BYTES = 8 << 30  # tokenizer_training_data refuses to hold more than this in RAM
READ_BATCH = 256  # images per read when a split is loaded into memory


# ------------------------------------------------------------------------------------ tokenizer
def default_device() -> torch.device:
    """The device cartlib trains on here (:func:`cartlib.hardware.device`)."""
    return hardware.device()


def tokenizer_training_data(cfg, split: str = "train", progress: bool = True, device=None):
    """A (small) split held in memory: (images float16 (N, 3, R, R), bases float16
    (N, n, 3, R, R) or None at order 0, labels int64 (N,)) — the pipeline's centre crops and
    their bases from the ``data.cache_bases`` switch (decomposed on ``device``, default: the
    GPU if there is one). For evaluation sets and smoke/tiny training; ImageNet-size splits
    stream instead (``train_tokenizer(cfg, run_dir)``) and are refused here."""
    source = source_for(cfg.data, split, progress)
    n, r, order = len(source), cfg.data.resolution, stored_order(cfg)
    need = n * 3 * r * r * 2 * (1 + order)
    if need > IN_MEMORY_BYTES:
        raise MemoryError(
            f"holding the {n} {split} images of {source.key} and their {order} bases in memory "
            f"needs {need / 2**30:.1f} GiB; lower data.train_limit/test_limit, or train from the "
            "stream (train_tokenizer(cfg, run_dir) without data=)"
        )
    device = torch.device(device) if device is not None else default_device()
    bases_of = Bases(cfg, source, device, progress)
    images = torch.empty(n, 3, r, r, dtype=torch.float16)
    bases = torch.empty(n, order, 3, r, r, dtype=torch.float16) if order else None
    labels = torch.empty(n, dtype=torch.long)
    reads = [[centre(i) for i in range(s, min(n, s + READ_BATCH))] for s in range(0, n, READ_BATCH)]
    for x, y, idx in batches(source, reads, cfg.data.workers, device.type == "cuda"):
        x = x.to(device).float().div_(255)  # (b, 3, R, R)
        images[idx], labels[idx] = x.half().cpu(), y
        if bases is not None:
            bases[idx] = bases_of(x, idx).half().cpu()
    return images, bases, labels


def tokenizer_dir(run_dir: str | Path, cfg) -> Path:
    """``tokenizer-<quantizer>-o<order>-<hash of its settings>``: one folder per distinct
    tokenizer (:meth:`RunConfig.artifact_key`: the precision included, not the process count), so
    notebooks can compare several and a changed setting never reuses a stale one."""
    return Path(run_dir) / cfg.stage_folder("tokenizer")


def train_tokenizer(
    cfg, run_dir: str | Path, progress: bool = True, stop_after: int | None = None, data=None
):
    """Train the VQ-VAE tokenizer of ``cfg`` (a RunConfig) with the compound loss (Eq. 2).

    Returns ``(tokenizer, history)``; checkpoints and ``history.json`` go to
    ``tokenizer_dir(run_dir, cfg)``. Without ``data`` the training set streams (see the module
    docstring); ``data`` = (images, bases or None, labels) in memory trains on those tensors as
    they are (no augmentation)."""
    t, d = cfg.tokenizer, cfg.data
    if t.init_from:
        return install_init_from(cfg, run_dir), []
    source = None if data is not None else source_for(d, "train", progress)  # data errors first
    out_dir = tokenizer_dir(run_dir, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    if process_state().is_main_process:
        clear_if_installed(out_dir)
    notes = start_notes(out_dir, cfg)  # before config.yaml is rewritten
    save_config(cfg.resolved(), out_dir / "config.yaml")  # the precision it trains in
    torch.manual_seed(t.seed)
    acc = make_accelerator(cfg.precision)
    cfg = plan_tokenizer(cfg, acc.num_processes, say=process_state().is_main_process)
    t = cfg.tokenizer
    n_items = len(data[0]) if data is not None else len(source)
    sampler = StepSampler(n_items, t.batch_size, t.seed, acc.process_index, acc.num_processes,
                          d.random_crop, d.hflip)  # fmt: skip
    if data is not None:
        images, bases, _ = data

        def fetch(step):
            idx = sampler.local_indices(step)
            x = images[idx].float().to(acc.device)
            return x, bases[idx].float().to(acc.device) if bases is not None else None
    else:
        stream = StepStream(source, sampler, acc.device, t.steps, d.workers)
        bases_of = Bases(cfg, source, acc.device, progress)

        def fetch(step):
            x, _, idx = stream(step)
            return x, bases_of(x, idx)

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

    quant = acc.unwrap_model(tok).quantizer
    micro = t.micro_batch or t.batch_size  # images per forward/backward (the rest accumulated)

    def step_fn(step: int) -> dict[str, float]:
        x, b = fetch(step)
        tok.train()
        parts = micro_batches(len(x), micro)
        if not bool(quant.initialized):  # a new run: from this batch, whatever its micro-batches
            with acc.autocast():
                acc.unwrap_model(tok).init_codebook(x, b, parts)
        opt.zero_grad(set_to_none=True)
        logs: dict[str, float] = {}
        fakes = []
        for i, part in enumerate(parts):
            share = (part.stop - part.start) / len(x)
            with no_sync(acc, (tok, crit.disc), last=i == len(parts) - 1):
                with acc.autocast():
                    out = tok(x[part], None if b is None else b[part])
                    loss, part_logs = crit.generator_loss(out, out.target, out.target_base, step)
                acc.backward(loss * share)
            fakes.append((out.recon.detach().float(), out.target))
            for k, v in part_logs.items():
                logs[k] = logs.get(k, 0.0) + v * share
            del out, loss
        acc.clip_grad_norm_(tok.parameters(), 1.0)
        opt.step()
        sch.step()
        if crit.gan_on(step):
            opt_d.zero_grad(set_to_none=True)
            logs["gan_d"] = 0.0
            for i, (fake, real) in enumerate(fakes):
                share = len(fake) / len(x)
                with no_sync(acc, (crit.disc,), last=i == len(fakes) - 1):
                    with acc.autocast():
                        d_loss = crit.discriminator_loss(fake, real)
                    acc.backward(d_loss * share)
                logs["gan_d"] += d_loss.item() * share
            opt_d.step()
        if t.dead_code_every and (step + 1) % t.dead_code_every == 0:
            if acc.num_processes > 1:  # a code is dead when no process used it
                torch.distributed.all_reduce(quant.usage)
            logs["used_codes"] = float((quant.usage > 0).sum())
            logs["restarted"] = float(quant.restart_dead_codes())
            if acc.num_processes > 1:
                broadcast(quant.codebook.weight.data, from_process=0)
        return logs

    try:
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
            notes=notes,
        )
    finally:
        if data is None:
            stream.close()
    tok = acc.unwrap_model(tok).eval()
    return tok, history


def install_init_from(cfg, run_dir: str | Path):
    """The finished tokenizer of ``cfg`` from ``tokenizer.init_from`` (VAR's released VQ-VAE,
    loaded strictly by :func:`cartlib.tokenizer.var_layout.load_var_state_dict`), written into
    its folder as the checkpoint of its last step: the tokenizer stage trains nothing."""
    path = Path(cfg.tokenizer.init_from).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer.init_from={cfg.tokenizer.init_from!r} does not exist: give the path of "
            "VAR's vae_ch160v4096z32.pth (huggingface.co/FoundationVision/var), or unset "
            "init_from to train the tokenizer"
        )
    tok = Tokenizer(cfg.tokenizer, cfg.decompose, cfg.data.resolution)
    load_var_state_dict(tok, path)  # strict: a wrong file or architecture says which key
    out_dir = tokenizer_dir(run_dir, cfg)
    state = process_state()
    if state.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg.resolved(), out_dir / "config.yaml")
        step = {"step": cfg.tokenizer.steps, "modules": {"tokenizer": tok.state_dict()}}
        save_checkpoint(out_dir, {**step, "history": [], "init_from": str(path.resolve())})
        print(f"tokenizer installed from {path} into {out_dir} (not trained)", flush=True)
    state.wait_for_everyone()
    return tok.eval()


def micro_batches(n: int, micro: int) -> list[slice]:
    """The consecutive parts of ``n`` images that go through forward and backward at once."""
    return [slice(s, min(n, s + micro)) for s in range(0, n, micro)]


def no_sync(acc, models, last: bool):
    """Gradient accumulation under DDP: no all-reduce of ``models``' gradients except in the
    backward of the ``last`` micro-batch (a plain context on one process)."""
    stack = contextlib.ExitStack()
    if not last and acc.num_processes > 1:
        for model in models:
            if model is not None:
                stack.enter_context(acc.no_sync(model))
    return stack


def load_tokenizer(path: str | Path):
    """A trained Tokenizer from its folder (config.yaml + last.pt), in eval mode."""
    how = "notebook 02, or cartlib.runs.ensure_tokenizer(cfg, run_dir)"
    cfg, state = load_stage(path, "tokenizer", how)
    tok = Tokenizer(cfg.tokenizer, cfg.decompose, cfg.data.resolution)
    tok.load_state_dict(state)
    return tok.eval()
