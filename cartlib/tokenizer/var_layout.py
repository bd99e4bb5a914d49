"""VAR's VQ-VAE checkpoint layout: VAR's released ``vae_ch160v4096z32.pth`` in and out.

With ``TokenizerConfig.arch = "var"`` the encoder, decoder, ``quant_conv`` and
``post_quant_conv`` carry VAR's parameter names already (``cartlib.tokenizer.vqvae``). Only the
quantizer is named differently, because it serves CART's schedules too:

    VAR (models/quant.py)                        cartlib (ScheduleQuantizer)
    quantize.embedding.weight                    quantizer.codebook.weight
    quantize.quant_resi.qresi_ls.{k}.{w,b}       quantizer.phis.{k}.conv.{w,b}   (phi_share K >= 2)
    quantize.quant_resi.qresi.{w,b}              quantizer.phis.0.conv.{w,b}     (phi_share 1)
    quantize.quant_resi.{k}.{w,b}                quantizer.phis.{k}.conv.{w,b}   (phi_share 0)
    quantize.ema_vocab_hit_SV (S, V)             -  (VAR's training statistics of code use)
    -                                            quantizer.usage, quantizer.initialized

Usage (VAR's tokenizer as the order-0 multi-scale tokenizer of a var-* preset)::

    cfg = load_preset("var-d16-256")
    tok = Tokenizer(cfg.tokenizer, cfg.decompose, cfg.data.resolution)
    load_var_state_dict(tok, "vae_ch160v4096z32.pth")
"""

from __future__ import annotations

import os
import re

import torch

from cartlib.tokenizer.tokenizer import Tokenizer
from cartlib.trust import load_torch

_OURS_PHI = re.compile(r"quantizer\.phis\.(\d+)\.conv\.(weight|bias)")
_VAR_PHI = re.compile(r"quantize\.quant_resi\.(?:qresi_ls\.(\d+)|qresi|(\d+))\.(weight|bias)")


def _var_phi(phi_share: int, k: int) -> str:
    if phi_share == 0:
        return f"quantize.quant_resi.{k}"
    return "quantize.quant_resi.qresi" if phi_share == 1 else f"quantize.quant_resi.qresi_ls.{k}"


def var_state_dict(tok: Tokenizer) -> dict[str, torch.Tensor]:
    """The tokenizer's state dict in VAR's names (``ema_vocab_hit_SV`` as zeros)."""
    share = tok.cfg.phi_share
    out = {}
    for key, value in tok.state_dict().items():
        phi = _OURS_PHI.fullmatch(key)
        if key == "quantizer.codebook.weight":
            out["quantize.embedding.weight"] = value
        elif phi:
            out[f"{_var_phi(share, int(phi[1]))}.{phi[2]}"] = value
        elif not key.startswith("quantizer."):
            out[key] = value
    v = tok.quantizer.codebook_size
    out["quantize.ema_vocab_hit_SV"] = torch.zeros(tok.schedule.n_steps, v)
    return out


def _var_phi_share(state: dict[str, torch.Tensor]) -> int:
    keys = [k for k in state if k.startswith("quantize.quant_resi.")]
    if any(".qresi_ls." in k for k in keys):
        return len({k.split(".")[3] for k in keys})
    return 1 if any(".qresi." in k for k in keys) else 0


def from_var_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """VAR's names -> ours (codebook marked initialised, usage counts zero)."""
    out = {}
    for key, value in state.items():
        phi = _VAR_PHI.fullmatch(key)
        if key == "quantize.embedding.weight":
            out["quantizer.codebook.weight"] = value
            out["quantizer.usage"] = torch.zeros(len(value))
            out["quantizer.initialized"] = torch.tensor(True)
        elif phi:
            k = int(phi[1] or phi[2] or 0)
            out[f"quantizer.phis.{k}.conv.{phi[3]}"] = value
        elif key != "quantize.ema_vocab_hit_SV":
            out[key] = value
    return out


def load_var_state_dict(tok: Tokenizer, state: dict | str | os.PathLike) -> Tokenizer:
    """Load VAR's VQ-VAE weights (a state dict or the ``.pth`` file) into ``tok`` strictly."""
    if not isinstance(state, dict):  # a plain tensor dict: no pickled code is run
        state = load_torch(state)
    if tok.cfg.arch != "var" or tok.order != 0:
        raise ValueError(
            f"VAR's VQ-VAE loads into an order-0 tokenizer with arch='var' (got arch="
            f"{tok.cfg.arch!r}, order {tok.order}): use a var-* preset, or set tokenizer.arch="
            "'var', quantizer='multiscale', decompose.order=0"
        )
    share = _var_phi_share(state)
    if share != tok.cfg.phi_share:
        raise ValueError(
            f"the checkpoint has {share} shared phi convs, the tokenizer phi_share="
            f"{tok.cfg.phi_share}: set tokenizer.phi_share={share}"
        )
    tok.load_state_dict(from_var_state_dict(state), strict=True)
    return tok
