"""Next-detail transformer training (notebook 04): token extraction, the loss, the loop, loading.

The transformer trains on token maps extracted once: in memory (a list of (N, h_k, w_k) tensors,
small runs and tests) or memory-mapped shards (:class:`cartlib.shards.TokenShards`, written by
``cartlib extract-tokens``), read a batch of rows at a time — never all tokens in RAM. With
several views per image (``data.views``), each step draws one view per item from (seed, step).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from cartlib.config import save_config
from cartlib.data.stream import Prefetch, StepSampler
from cartlib.io import atomic_write_bytes, process_state
from cartlib.model import build_model
from cartlib.shards import TokenShards, tokenizer_hash
from cartlib.train.checkpoints import clear_if_installed, start_notes
from cartlib.train.loop import (
    build_optimizer,
    load_stage,
    lr_lambda,
    make_accelerator,
    run_loop,
    set_weight_decay,
    weight_decay_at,
)
from cartlib.train.parallel import checkpoint_blocks, gradient_sync, shard_per_block
from cartlib.train.sharded import is_sharded

TOKENIZER_HASH = "tokenizer_hash.txt"  # in a transformer's folder: the tokenizer of its tokens
# A transformer whose cross-entropy exceeds this many times ln V (a uniform guess over the V
# codes; where a run starts) has diverged: training stops and nothing of it is saved. Measured
# on the tests' transformer: a healthy run starts at 1.00 x ln V and falls; at lr 3e3 and 1e4
# the second step's loss is 2.4e5 and 1.3e7 x ln V (before this check they finished, rc 0).
LOSS_LIMIT = 4.0


# ------------------------------------------------------------------------------- next-detail AR
@torch.no_grad()
def extract_tokens(tokenizer, images, bases=None, batch_size: int = 256, progress=True):
    """Alg. 1 over a whole (in-memory) dataset. -> list of M int16 tensors (N, h_k, w_k)."""
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


@torch.no_grad()
def heldout_ce(model, tokenizer, images, bases, labels, batch_size: int = 64) -> dict:
    """Teacher-forced cross-entropy (nats per token) of the tokens of held-out ``images`` under
    their class ``labels``: ``ce`` over all tokens and ``ce_per_step`` (M,), Eq. 9 per map."""
    device = next(model.parameters()).device
    tokens = extract_tokens(tokenizer, images, bases, progress=False)
    sched = model.schedule
    total, per, n = 0.0, torch.zeros(sched.n_steps, dtype=torch.float64), 0
    for i in range(0, len(images), batch_size):
        maps = [t[i : i + batch_size].long().to(device) for t in tokens]
        x = torch.cat([r.flatten(1) for r in maps], dim=1)
        inputs = tokenizer.quantizer.teacher_inputs(maps)
        logits = model(labels[i : i + batch_size].to(device), inputs)
        loss, per_loss, _ = ar_loss(logits, x, model.level_ids, sched.n_steps)
        total += float(loss) * len(x)
        per += per_loss.double().cpu() * len(x)
        n += len(x)
    return {"ce": total / n, "ce_per_step": (per / n).tolist()}


def trained_on(folder: str | Path) -> str | None:
    """The hash of the tokenizer whose tokens the transformer in ``folder`` learned
    (:data:`TOKENIZER_HASH`), or None for a folder written before it was recorded."""
    path = Path(folder) / TOKENIZER_HASH
    return path.read_text().strip() if path.is_file() else None


def check_tokenizer(folder: str | Path, tokenizer) -> None:
    """Refuse a transformer folder whose tokens came from another tokenizer than ``tokenizer``
    (folders written before :data:`TOKENIZER_HASH` existed pass)."""
    recorded = trained_on(folder)
    if recorded is not None and recorded != (now := tokenizer_hash(tokenizer)):
        raise ValueError(
            f"the transformer in {folder} was trained on the tokens of tokenizer {recorded}, "
            f"not of the one given ({now}): that tokenizer was retrained or replaced since. "
            f"Delete {folder} to train the transformer again on the new tokenizer's tokens"
        )


def ar_loss(logits: torch.Tensor, targets: torch.Tensor, level_ids: torch.Tensor, n_steps: int):
    """Cross-entropy over all token maps, plus per-step loss and accuracy (for the logs).
    logits (B,L,V), targets (B,L) -> (loss, per-step loss (M,), per-step acc (M,)), all fp32
    whatever the logits' dtype (bf16 under autocast or an FSDP bf16 policy)."""
    logits = logits.float()
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    hit = (logits.argmax(-1) == targets).float()
    count = torch.bincount(level_ids, minlength=n_steps).float() * len(targets)
    per_loss = torch.zeros(n_steps, device=ce.device).index_add_(0, level_ids, ce.sum(0)) / count
    per_acc = torch.zeros(n_steps, device=ce.device).index_add_(0, level_ids, hit.sum(0)) / count
    return ce.mean(), per_loss.detach(), per_acc.detach()


def step_logs(acc, loss, grad_norm, per_loss, per_acc) -> dict[str, float]:
    """The logged numbers of one step, averaged over the processes (each saw its share of the
    batch): one all-reduce and one device-to-host copy per step, not one per number."""
    head = [loss.reshape(1).float(), per_acc.mean().reshape(1)]
    norm = torch.as_tensor(grad_norm, dtype=torch.float32, device=loss.device).reshape(1)
    values = torch.cat([*head, per_loss, per_acc, norm])  # the norm is the same on every process
    if acc.num_processes > 1:
        values = acc.reduce(values, reduction="mean")
    values = values.tolist()
    m = len(per_loss)
    logs = {"loss": values[0], "acc": values[1], "grad_norm": values[-1]}
    logs.update({f"loss_{i}": v for i, v in enumerate(values[2 : 2 + m])})
    logs.update({f"acc_{i}": v for i, v in enumerate(values[2 + m : 2 + 2 * m])})
    return logs


def ar_dir(run_dir: str | Path, cfg) -> Path:
    """``ar-d<depth>-<quantizer>-o<order>-<hash>``: keyed by every setting the transformer
    depends on (:meth:`RunConfig.artifact_key`: its tokenizer's and the precision; not the
    process count, which changes how a step is laid out, not what it computes)."""
    return Path(run_dir) / cfg.stage_folder("ar")


def token_rows(tokens) -> tuple[int, int, object]:
    """(images, views, rows) of extracted tokens: ``rows(idx, view)`` -> int64 (b, L), the
    flattened sequences r_1..r_M of items ``idx`` in view ``view``. ``tokens``: TokenShards
    (read from disk per batch) or a list of M in-memory tensors (N, h_k, w_k)."""
    if isinstance(tokens, TokenShards):
        return len(tokens), tokens.views, tokens.rows
    flat = torch.cat([t.flatten(1) for t in tokens], 1)  # (N, L)
    return len(flat), 1, lambda idx, view: flat[idx].long()


def micro_batches(a, num_processes: int) -> tuple[int, int]:
    """(micro-batch, accumulation steps) per process for ``ar`` settings ``a``: the global batch
    ``batch_size`` = micro-batch x accumulation x processes, whatever the process count."""
    if a.batch_size % num_processes:
        raise ValueError(
            f"ar.batch_size={a.batch_size} does not split over {num_processes} processes: "
            "choose a batch size divisible by the process count"
        )
    local = a.batch_size // num_processes
    micro = a.micro_batch or local
    if local % micro:
        raise ValueError(
            f"ar.micro_batch={micro} does not divide the {local} images per process "
            f"(batch_size {a.batch_size} / {num_processes} processes): choose a divisor of {local}"
        )
    return micro, local // micro


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
    """Train the next-detail transformer on extracted ``tokens`` (TokenShards, or a list of
    (N, h_k, w_k) tensors) with ``labels`` (N,). AdamW (0.9, 0.95) without decay on biases, norms
    and position/level embeddings (VAR), lr = ar.lr x batch / 256 (VAR's scaling), warm-up then
    cosine (or VAR's ``lin0``) decay to ``lr_end``, optional cosine weight-decay schedule,
    gradient clipping, label dropout for classifier-free guidance.

    With ``ar.fsdp`` the model is fully sharded per block (torch's ``fully_shard``, over nccl on
    GPUs and gloo on CPUs); checkpoints are then sharded and the returned model is the
    consolidated export, unsharded, on the main process (None on the others)."""
    a = cfg.ar
    out_dir = ar_dir(run_dir, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    main = process_state().is_main_process
    if main:
        clear_if_installed(out_dir)
    check_tokenizer(out_dir, tokenizer)  # resuming on another tokenizer's tokens: refused
    notes = start_notes(out_dir, cfg)  # before config.yaml is rewritten
    save_config(cfg.resolved(), out_dir / "config.yaml")  # the precision it trains in
    (out_dir / "num_classes.txt").write_text(str(num_classes))
    if main:  # atomic: the other processes may be reading it in check_tokenizer
        atomic_write_bytes(out_dir / TOKENIZER_HASH, tokenizer_hash(tokenizer).encode())
    torch.manual_seed(a.seed)  # every process builds the same initial weights (FSDP needs it)
    acc = make_accelerator(cfg.precision, fsdp=a.fsdp)
    # teacher forcing needs only the quantizer's codebook and phi convs on the device, not the
    # VQ-VAE's encoder and decoder (VAR's: 109M parameters); a copy: the caller's stays as it is
    quantizer = copy.deepcopy(tokenizer.quantizer).to(acc.device).eval().requires_grad_(False)
    sched = tokenizer.schedule
    if a.fsdp:  # one path on CPUs (gloo) and GPUs (nccl): torch's fully_shard, fp32 reduction
        model = sharded_model(cfg, sched, num_classes, acc)  # before the optimizer
    else:
        model = build_model(cfg, sched, num_classes)
        if a.grad_ckpt:
            checkpoint_blocks(model)
    if acc.process_index:  # its own DropPath/dropout draws; rank 0 keeps the one-process stream
        torch.manual_seed(a.seed + 7919 * acc.process_index)
    lr = a.lr * a.batch_size / 256
    opt = build_optimizer(model, lr, a.weight_decay)
    lrs = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(a.warmup, a.steps, a.lr_end, a.lr_schedule)
    )
    if a.fsdp:  # sharded already: accelerate would wrap it in DDP
        opt = acc.prepare(opt)
    else:
        model, opt = acc.prepare(model, opt)
    core = acc.unwrap_model(model)
    n_items, views, rows = token_rows(tokens)
    sampler = StepSampler(n_items, a.batch_size, a.seed, acc.process_index, acc.num_processes)
    micro, accumulation = micro_batches(a, acc.num_processes)

    def read(step: int):
        """This process's share of step ``step``'s batch: tokens, labels with CFG's label
        dropout applied — both drawn for the whole global batch from the step's generator, so
        the step is the same at any process count and micro-batch size."""
        idx, g = sampler.indices(step), sampler.generator(step)
        view = torch.randint(views, idx.shape, generator=g)
        drop = torch.rand(idx.shape, generator=g) < a.cond_drop
        mine = slice(sampler.rank, None, sampler.world)
        idx, view, drop = idx[mine], view[mine], drop[mine]
        x = rows(idx, view)  # (b, L)
        y = torch.where(drop, torch.tensor(num_classes), labels[idx].long())
        return (x.pin_memory(), y.pin_memory()) if acc.device.type == "cuda" else (x, y)

    prefetch = Prefetch(read, a.steps)  # the next step's rows are read while this one trains

    def fetch(step: int):
        x, y = prefetch(step)
        return x.to(acc.device, non_blocking=True), y.to(acc.device, non_blocking=True)

    def backward(x, y, sync: bool):
        """Forward and backward of one micro-batch; gradients summed over the micro-batches
        (each loss / accumulation) and synchronised across processes only on the last."""
        maps = [x[:, sched.step_slice(m)].view(-1, s.h, s.w) for m, s in enumerate(sched)]
        with torch.no_grad():
            inputs = quantizer.teacher_inputs(maps)
        with gradient_sync(model, acc, sync):
            with acc.autocast():
                logits = model(y, inputs)
            loss, per_loss, per_acc = ar_loss(logits, x, core.level_ids, sched.n_steps)
            acc.backward(loss / accumulation)
        return loss.detach(), per_loss, per_acc

    last = {}  # the first micro-batch of the last step (checked under the updated weights)

    def step_fn(step: int) -> dict[str, float]:
        x, y = fetch(step)
        last["batch"] = x[:micro], y[:micro]
        model.train()
        opt.zero_grad(set_to_none=True)
        parts = [
            backward(x[i : i + micro], y[i : i + micro], sync=i + micro >= len(x))
            for i in range(0, len(x), micro)
        ]
        loss, per_loss, per_acc = (torch.stack(t).mean(0) for t in zip(*parts))
        gnorm = acc.clip_grad_norm_(model.parameters(), a.grad_clip)
        if a.weight_decay_end is not None:  # VAR's schedule; a pure function of the step
            set_weight_decay(
                opt, weight_decay_at(step, a.steps, a.weight_decay, a.weight_decay_end)
            )
        opt.step()
        lrs.step()
        if isinstance(gnorm, DTensor):  # FSDP: the norm over all shards
            gnorm = gnorm.full_tensor()
        return step_logs(acc, loss, gnorm, per_loss, per_acc)

    @torch.no_grad()
    def after_update() -> dict[str, float]:
        """The loss of the last step's first micro-batch under the updated weights (eval mode:
        no dropout, nothing drawn from the RNG), averaged over the processes (collective)."""
        x, y = last["batch"]
        maps = [x[:, sched.step_slice(m)].view(-1, s.h, s.w) for m, s in enumerate(sched)]
        model.eval()
        with acc.autocast():
            logits = model(y, quantizer.teacher_inputs(maps))
        loss = ar_loss(logits, x, core.level_ids, sched.n_steps)[0].reshape(1)
        return {"loss": float(acc.reduce(loss, "mean") if acc.num_processes > 1 else loss)}

    try:
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
            loss_limit=LOSS_LIMIT * math.log(tokenizer.quantizer.codebook_size),
            after_update=after_update,
            notes=notes,
        )
    finally:
        prefetch.close()
    if is_sharded(core):  # the consolidated export the last save wrote, as sampling loads it:
        # read by the main process only (a d30 is 8 GB of host memory per process that reads it)
        model = load_ar(out_dir, tokenizer).to(acc.device) if acc.is_main_process else None
        return model, history
    return core.eval(), history


def sharded_model(cfg, schedule, num_classes: int, acc):
    """The transformer of ``cfg``, fully sharded per block (FSDP2), with the initial weights one
    process would have: built on the meta device by every process, sharded, materialised on its
    device, then filled from the one whole model that the main process builds and broadcasts
    (a d30 in fp32 is 8 GB of host memory: one copy per run, not one per process)."""
    full = build_model(cfg, schedule, num_classes) if acc.is_main_process else None
    model = build_model(cfg, schedule, num_classes, device="meta")
    if cfg.ar.grad_ckpt:
        checkpoint_blocks(model)
    shard_per_block(model, cfg.precision)
    model.to_empty(device=acc.device)
    model.init_buffers()
    whole = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full.state_dict() if full is not None else {}, options=whole)
    return model


def load_ar(path: str | Path, tokenizer):
    """A trained transformer from its folder (config.yaml + last.pt), in eval mode."""
    how = "notebook 04, or cartlib.runs.ensure_ar(cfg, run_dir)"
    cfg, state = load_stage(path, "model", how, extra=("num_classes.txt",))
    check_tokenizer(path, tokenizer)
    model = build_model(cfg, tokenizer.schedule, int((Path(path) / "num_classes.txt").read_text()))
    model.load_state_dict(state)
    return model.eval()
