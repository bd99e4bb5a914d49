"""Whether a device runs every operation cartlib trains and samples with: one training step of a
small tokenizer and transformer, with the decomposition, token extraction and sampling.

:func:`cartlib.hardware.device` runs it on Apple's ``mps`` (in a fresh process, ``python -m
cartlib probe-device mps``: a missing kernel may crash the process rather than raise) before it
trains there, and falls back to the CPU, saying why, when it fails."""

from __future__ import annotations

import torch

from cartlib.config import load_preset
from cartlib.model import build_model
from cartlib.sample import generate
from cartlib.tokenizer.tokenizer import Tokenizer
from cartlib.train.ar import extract_tokens


def run_probe(dev: torch.device | str) -> None:
    """Raise where ``dev`` lacks an operation of cartlib's training or sampling."""
    dev = torch.device(dev)
    cfg = load_preset("smoke", mixed_precision="no")
    r = cfg.data.resolution
    tok = Tokenizer(cfg.tokenizer, cfg.decompose, r).to(dev)
    x = torch.rand(2, 3, r, r, device=dev)
    out = tok(x, tok.decompose(x))
    (out.recon.float() - x).square().mean().backward()
    tok.eval().requires_grad_(False)
    maps = extract_tokens(tok, x, tok.decompose(x), progress=False)
    model = build_model(cfg, tok.schedule, 2, device=dev)
    labels = torch.zeros(2, dtype=torch.long, device=dev)
    logits = model(labels, tok.quantizer.teacher_inputs([m.long().to(dev) for m in maps]))
    logits.float().mean().backward()
    generate(model.eval(), tok, labels, **cfg.sample.generate_kwargs())
