"""Train the transformer 3 optimizer steps on fixed synthetic tokens and save its parameters.

Used by tests/test_layout.py, in-process and under ``accelerate launch`` with 2 CPU processes:
``python tests/layout_probe.py RUN_DIR MICRO_BATCH OUT`` (MICRO_BATCH 0 = no accumulation).
tests/fsdp_probe.py trains the same setup under FSDP (:func:`setup`).
"""

from __future__ import annotations

import os
import sys

import torch

from cartlib.config import load_preset
from cartlib.launch import leave_process_group
from cartlib.tokenizer import Tokenizer
from cartlib.train import train_ar

TOK = {"channels": 8, "ch_mult": [1, 2, 2], "latent_channels": 4, "codebook_size": 32}
AR = {"depth": 2, "width": 32, "heads": 2, "steps": 3, "batch_size": 8, "warmup": 1, "lr": 0.5}


def setup(micro: int = 0, **ar):
    """(config, tokenizer, tokens, labels) of the probe: fixed random tokenizer and tokens."""
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ar = {**AR, "micro_batch": micro or None, "cond_drop": 0.5, **ar}
    cfg = load_preset("smoke", tokenizer=TOK, ar=ar, mixed_precision="no", num_processes=world)
    torch.manual_seed(0)
    tok = Tokenizer(cfg.tokenizer, cfg.decompose, cfg.data.resolution)  # fixed random weights
    g = torch.Generator().manual_seed(1)
    tokens = [torch.randint(32, (32, s.h, s.w), generator=g) for s in tok.schedule]
    labels = torch.randint(10, (32,), generator=g)
    return cfg, tok, tokens, labels


def main(run_dir: str, micro: int, out: str) -> None:
    cfg, tok, tokens, labels = setup(micro)
    model, history = train_ar(cfg, run_dir, tok, tokens, labels, 10, progress=False)
    if int(os.environ.get("RANK", "0")) == 0:
        ranks = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        losses = [h["loss"] for h in history]
        torch.save({"params": model.state_dict(), "loss": losses, "processes": ranks}, out)
    leave_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
