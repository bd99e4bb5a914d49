"""Run one training step and print its measured peak memory next to cartlib.fit's estimate.

Used by tests/test_fit.py in a subprocess, with MALLOC_MMAP_THRESHOLD_ fixed so that freed
activations leave the resident set:

* ``python tests/memory_probe.py CKPT BATCH DEPTH WIDTH``: a transformer step; the estimate is
  activations + logits in fp32;
* ``python tests/memory_probe.py tokenizer BATCH RESOLUTION CHANNELS``: a step of the full-scale
  presets' tokenizer (VAR's architecture at ``CHANNELS``, order 3, perceptual loss and
  discriminator on) in fp32; the estimate is the activations part of
  :func:`cartlib.fit.tokenizer_memory`, measured at a smaller resolution and scaled.

The rise of the peak resident set during the second step (the first allocated the optimizer
state) is compared with the estimate.

Two more measure the gradient terms of :func:`cartlib.fit.training_memory`, in bytes per
parameter of a stack of linear layers (large weights, few activations), by the resident set:

* ``accelerate launch --multi_gpu --num_processes 2 tests/memory_probe.py ddp``: DDP as
  :func:`cartlib.train.loop.make_accelerator` sets it, then with accelerate's default
  ``gradient_as_bucket_view=False``: what wrapping and a first step leave (AdamW's moments and
  DDP's bucket) and what a backward adds to it (gradients apart from the bucket);
* ``python tests/memory_probe.py fsdp-accumulation``: FSDP2 (one gloo process) with training's
  bf16 policy: what a backward without gradient sync keeps (the unsharded gradients, in the
  reduce dtype).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

from cartlib.config import load_preset
from cartlib.fit import tokenizer_activation_probe, tokenizer_memory, training_memory
from cartlib.model import build_model
from cartlib.tokenizer import Tokenizer
from cartlib.train import ar_loss
from cartlib.train.parallel import checkpoint_blocks

STATUS = Path("/proc/self/status")


def resident(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) in bytes."""
    return int(re.search(rf"{field}:\s+(\d+) kB", STATUS.read_text()).group(1)) * 1024


def main(ckpt: bool, batch: int, depth: int, width: int) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = load_preset("smoke", ar={"depth": depth, "width": width, "heads": 4})
    sched = cfg.schedule()
    model = build_model(cfg, sched, 10)
    if ckpt:
        checkpoint_blocks(model)
    quant = Tokenizer(cfg.tokenizer, cfg.decompose, cfg.data.resolution).quantizer
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    v = cfg.tokenizer.codebook_size
    maps = [torch.randint(v, (batch, s.h, s.w)) for s in sched]
    targets = torch.cat([m.flatten(1) for m in maps], 1)
    with torch.no_grad():
        inputs = quant.teacher_inputs(maps)
    labels, level_ids = torch.randint(10, (batch,)), sched.level_ids()

    def step():
        loss, _, _ = ar_loss(model(labels, inputs), targets, level_ids, sched.n_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    base = resident("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    step()
    measured = resident("VmHWM") - base
    est = training_memory(
        model.num_params(),
        depth,
        width,
        sched.seq_len,
        v,
        batch,
        checkpointing=ckpt,
        precision="no",
    )
    step_est = est["activations"] + est["logits"]
    return {"measured": measured, "estimate": step_est, "ratio": measured / step_est}


def tokenizer_step(batch: int, resolution: int, channels: int) -> dict:
    from cartlib.perceptual import lpips_model
    from cartlib.tokenizer.losses import CompoundLoss

    torch.set_num_threads(1)
    latent = resolution // 16
    cfg = load_preset("cart-d16-256")
    patches = tuple(p for p in cfg.tokenizer.base_patch_nums if p < latent) + (latent,)
    cfg = cfg.updated(
        data={"resolution": resolution},
        tokenizer={"channels": channels, "base_patch_nums": patches, "gan_start": 0},
    )
    probe = tokenizer_activation_probe(cfg, "no")  # measured at 32px, scaled to `resolution`
    torch.manual_seed(0)
    tok = Tokenizer(cfg.tokenizer, cfg.decompose, resolution).train()
    crit = CompoundLoss(cfg.tokenizer, lpips_model(check_range=False))
    opt = torch.optim.AdamW([*tok.parameters(), *crit.disc.parameters()], lr=1e-4)
    x = torch.rand(batch, 3, resolution, resolution)
    bases = torch.rand(batch, tok.order, 3, resolution, resolution)

    def step():
        out = tok(x, bases)
        loss, _ = crit.generator_loss(out, out.target, out.target_base, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    base = resident("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    step()
    measured = resident("VmHWM") - base
    est = tokenizer_memory(probe, resolution, batch)["activations"]
    return {"measured": measured, "estimate": est, "ratio": measured / est}


def _linear_stack(width: int = 1024, layers: int = 16) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))


def ddp_step(acc, view: bool) -> dict:
    from cartlib.train.loop import build_optimizer

    acc.ddp_handler.gradient_as_bucket_view = view
    net = _linear_stack()
    n = sum(p.numel() for p in net.parameters())
    x = torch.randn(4, 1024)
    opt = build_optimizer(net, 1e-4, 0.0)
    before = resident("VmRSS")
    net, opt = acc.prepare(net, opt)
    for _ in range(2):  # the first step allocates the moments, and DDP writes its bucket
        opt.zero_grad(set_to_none=True)
        acc.backward(net(x).square().mean())
        opt.step()
    opt.zero_grad(set_to_none=True)
    kept = resident("VmRSS")
    acc.backward(net(x).square().mean())
    grads = resident("VmRSS") - kept
    storages = {p.grad.untyped_storage().data_ptr() for p in net.parameters()}
    acc.free_memory()  # the next measurement starts from what this one found
    return {
        "kept_per_param": (kept - before) / n,  # AdamW's moments + DDP's bucket
        "backward_per_param": grads / n,  # gradients apart from the bucket
        "grad_storages": len(storages),
        "params": len(list(net.parameters())),
    }


def ddp_steps() -> dict | None:
    """:func:`ddp_step` with the bucket view (training's setting), then without."""
    import gc

    from cartlib.train.loop import make_accelerator

    torch.set_num_threads(1)
    acc = make_accelerator("no", cpu=True)
    out = {"processes": acc.num_processes, "view": ddp_step(acc, True)}
    gc.collect()
    out["apart"] = ddp_step(acc, False)
    return out if acc.is_main_process else None


def fsdp_accumulation() -> dict:
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from cartlib.train.parallel import sharding_policy

    torch.set_num_threads(1)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", sys.argv[2] if len(sys.argv) > 2 else "29531")
    dist.init_process_group("gloo", rank=0, world_size=1)
    net, policy = _linear_stack(), sharding_policy("bf16")
    n = sum(p.numel() for p in net.parameters())
    for layer in net:
        fully_shard(layer, mp_policy=policy)
    fully_shard(net, mp_policy=policy)
    x = torch.randn(4, 1024)

    def backward():  # under autocast, as training runs it
        with torch.autocast("cpu", torch.bfloat16):
            y = net(x)
        y.float().square().mean().backward()

    backward()  # warm-up with gradient sync: the allocator, autograd and FSDP's buffers
    for p in net.parameters():
        p.grad = None
    before = resident("VmRSS")
    net.set_requires_gradient_sync(False)
    backward()  # the first micro-batch: its gradients stay unsharded, upcast
    kept = resident("VmRSS")
    backward()  # the second accumulates into them
    second = resident("VmRSS") - kept
    held = [
        fp.unsharded_accumulated_grad
        for m in net.modules()
        if hasattr(m, "_get_fsdp_state") and m._get_fsdp_state()._fsdp_param_group
        for fp in m._get_fsdp_state()._fsdp_param_group.fsdp_params
    ]  # fmt: skip
    dist.destroy_process_group()
    return {
        "dtypes": sorted({str(g.dtype) for g in held if g is not None}),
        "held_per_param": sum(g.nbytes for g in held if g is not None) / n,
        "second_backward_per_param": second / n,
        "kept_per_param": (kept - before) / n,
    }


if __name__ == "__main__":
    if sys.argv[1] == "ddp":
        out = ddp_steps()
        if out is not None:
            print(json.dumps(out))
    elif sys.argv[1] == "fsdp-accumulation":
        print(json.dumps(fsdp_accumulation()))
    elif sys.argv[1] == "tokenizer":
        print(json.dumps(tokenizer_step(*map(int, sys.argv[2:5]))))
    else:
        ckpt, batch, depth, width = sys.argv[1] == "1", *map(int, sys.argv[2:5])
        print(json.dumps(main(ckpt, batch, depth, width)))
