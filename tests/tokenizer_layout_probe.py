"""Train a small tokenizer 3 steps on fixed in-memory images and save its parameters.

Used by tests/test_tokenizer_layout.py, in-process and under ``accelerate launch`` with 2 CPU
processes: ``python tests/tokenizer_layout_probe.py RUN_DIR MICRO_BATCH OUT`` (MICRO_BATCH 0 =
the whole per-process batch at once). The discriminator is on from the first step. No dead-code
restart (its broadcast would hide a codebook that differs between processes): every rank's
parameters are compared with rank 0's (``rank_diff``: 0 when the processes hold one model; each
process used to initialise the codebook from its own first images, 1.55 apart after 3 steps).
"""

from __future__ import annotations

import os
import sys

import torch

from cartlib.config import load_preset
from cartlib.launch import leave_process_group
from cartlib.train import train_tokenizer

TOK = {"channels": 8, "ch_mult": [1, 2], "latent_channels": 4, "codebook_size": 16,
       "base_patch_nums": [1, 2, 4, 8], "batch_size": 8, "steps": 3, "lr": 3e-3, "w_lpips": 0.0,
       "w_gan": 0.1, "gan_start": 0, "dead_code_every": 0, "ckpt_every": 100}  # fmt: skip


def main(run_dir: str, micro: int, out: str) -> None:
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = load_preset(
        "smoke", data={"resolution": 16}, decompose={"order": 1},
        tokenizer={**TOK, "micro_batch": micro or None}, mixed_precision="no", num_processes=world,
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    images = torch.rand(32, 3, 16, 16, generator=g)
    bases = torch.rand(32, 1, 3, 16, 16, generator=g)  # any bases: the step's arithmetic is tested
    tok, history = train_tokenizer(cfg, run_dir, progress=False, data=(images, bases, None))
    flat = torch.cat([p.detach().flatten() for p in tok.parameters()])  # not the local hit counts
    rank_diff = 0.0
    if torch.distributed.is_initialized():
        every = [torch.empty_like(flat) for _ in range(world)]
        torch.distributed.all_gather(every, flat)
        rank_diff = max((e - every[0]).abs().max().item() for e in every)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({"params": tok.state_dict(), "loss": [h["loss"] for h in history],
                    "rank_diff": rank_diff, "processes": world}, out)  # fmt: skip
    leave_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
