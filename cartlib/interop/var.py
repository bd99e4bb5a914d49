"""VAR's released VQ-VAE and transformer installed into a run directory.

The conversions are :func:`cartlib.tokenizer.var_layout.load_var_state_dict` and
:func:`cartlib.model.var_import.load_var_transformer`; this module writes their results where
the run's stages look for finished checkpoints, which needs the training layer's folder names
and checkpoint format — the reason it sits here and not in ``cartlib.model``. Usage (``python
-m cartlib import-var``, ``docs/var-import.md``)::

    cfg = load_preset("var-d16-256")
    install_var_run(cfg, "runs/var-d16", "vae_ch160v4096z32.pth", "var_d16.pth")
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cartlib import train
from cartlib.config import save_config
from cartlib.io import atomic_write_bytes
from cartlib.model import build_model
from cartlib.model.var_import import load_var_transformer
from cartlib.shards import tokenizer_hash
from cartlib.tokenizer.tokenizer import Tokenizer
from cartlib.tokenizer.var_layout import load_var_state_dict
from cartlib.train.ar import TOKENIZER_HASH
from cartlib.train.checkpoints import INSTALLED, save_checkpoint
from cartlib.trust import UnsafeFileError, load_torch


def read_weights(source: dict | str | os.PathLike, what: str) -> dict:
    """The state dict ``source``, or read from that file without running code from it
    (:func:`cartlib.trust.load_torch`); a file that is not one is a ValueError naming ``what``
    and the file. Both files are read before anything is written."""
    if isinstance(source, dict):
        return source
    try:
        sd = load_torch(source)
    except UnsafeFileError as e:
        raise UnsafeFileError(f"{what}: {e}") from None
    except Exception as e:  # a missing file, a truncated or foreign one
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ValueError(
            f"{what}: {source} cannot be read as a torch weights file ({type(e).__name__}: "
            f"{first}); give VAR's released file (vae_ch160v4096z32.pth, var_d16.pth ...)"
        ) from None
    if not isinstance(sd, dict):
        raise ValueError(f"{what}: {source} holds a {type(sd).__name__}, not a state dict")
    return sd


def install_var_run(
    cfg, run_dir, vae: dict | str | os.PathLike, var: dict | str | os.PathLike, num_classes=1000
) -> tuple[Path, Path]:
    """Write VAR's VQ-VAE (``vae``) and transformer (``var``), files or state dicts, into
    ``run_dir`` as the finished tokenizer and transformer stages of ``cfg`` (an order-0 VAR
    preset: var-d16-256 ... var-d30-256), so that every stage of the run (``python -m cartlib
    sample``, the notebooks' ``ensure_ar``) uses them as if trained there. Both folders are
    marked installed, as :mod:`cartlib.shipped` marks its checkpoints: training into one (e.g.
    ``-p retrain True``) empties it and trains anew. -> (tokenizer folder, transformer folder)"""
    cfg = cfg.resolved()
    vae_sd = read_weights(vae, "the VQ-VAE (--vae)")
    var_sd = read_weights(var, "the transformer (--var)")
    tok = Tokenizer(cfg.tokenizer, cfg.decompose, cfg.data.resolution)
    load_var_state_dict(tok, vae_sd)
    model = load_var_transformer(build_model(cfg, tok.schedule, num_classes), var_sd)
    stages = (
        (train.tokenizer_dir(run_dir, cfg), "tokenizer", tok, cfg.tokenizer.steps, vae),
        (train.ar_dir(run_dir, cfg), "model", model, cfg.ar.steps, var),
    )
    for folder, module, net, steps, source in stages:
        folder.mkdir(parents=True, exist_ok=True)
        save_config(cfg, folder / "config.yaml")
        state = {"step": steps, "modules": {module: net.state_dict()}, "history": []}
        save_checkpoint(folder, state)
        what = "a state dict" if isinstance(source, dict) else str(source)
        marker = {"source": f"VAR's released weights ({what}), by cartlib.interop.var"}
        atomic_write_bytes(folder / INSTALLED, json.dumps(marker, indent=1).encode())
    ar_folder = stages[1][0]
    (ar_folder / "num_classes.txt").write_text(str(num_classes))
    (ar_folder / TOKENIZER_HASH).write_text(tokenizer_hash(tok))
    return stages[0][0], ar_folder
