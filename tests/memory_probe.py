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


if __name__ == "__main__":
    if sys.argv[1] == "tokenizer":
        print(json.dumps(tokenizer_step(*map(int, sys.argv[2:5]))))
    else:
        ckpt, batch, depth, width = sys.argv[1] == "1", *map(int, sys.argv[2:5])
        print(json.dumps(main(ckpt, batch, depth, width)))
