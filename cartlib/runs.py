"""Run directories, artifacts and reproducibility.

A run directory holds ``config.yaml``, checkpoints (written atomically: temp file + rename),
``results.json`` and figures. Relative run directories are resolved against the project root, so a
notebook executed from ``notebooks/`` (nbval, Jupyter) and one executed by papermill from the root
write to the same place.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def project_root() -> Path:
    """The folder holding cartlib's pyproject.toml (falls back to the current directory)."""
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for d in (start, *start.parents):
            if (d / "pyproject.toml").exists() and (d / "cartlib").is_dir():
                return d
    return Path.cwd()


def resolve_run_dir(run_dir: str | os.PathLike, create: bool = True) -> Path:
    path = Path(run_dir).expanduser()
    if not path.is_absolute():
        path = project_root() / path
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash never leaves a half-written file there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temp file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_results(run_dir: str | os.PathLike, section: str, values: dict[str, Any]) -> Path:
    """Merge ``values`` under ``section`` into ``<run_dir>/results.json`` (atomically)."""
    path = resolve_run_dir(run_dir) / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[section] = {**results.get(section, {}), **values}
    atomic_write_bytes(path, (json.dumps(results, indent=2, default=_jsonable) + "\n").encode())
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (np.generic, torch.Tensor)):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"results.json cannot hold {type(obj).__name__}: {obj!r}")


def seed_everything(seed: int, deterministic: bool = False) -> torch.Generator:
    """Seed python, numpy and torch (all devices); return a torch Generator seeded the same."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.Generator().manual_seed(seed)


def cache_dir(*parts: str) -> Path:
    """Where one-time results are cached (decompositions, converted weights, reference stats).

    ``$CART_CACHE_DIR`` if set, else ``~/.cache/cartlib``; ``parts`` name a subfolder (created).
    """
    root = Path(os.environ.get("CART_CACHE_DIR", Path.home() / ".cache" / "cartlib")).expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------------- stage artifacts
def config_hash(cfg, sections: tuple[str, ...]) -> str:
    """A short stable hash of the named config sections (what an artifact depends on)."""
    import hashlib

    d = cfg.to_dict()
    blob = json.dumps({s: d[s] for s in sections}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:8]


def tokenizer_sections(cfg) -> tuple[str, ...]:
    return (
        ("data", "decompose", "tokenizer")
        if cfg.tokenizer.quantizer == "base_detail"
        else ("data", "tokenizer")
    )


def _finished(folder: Path, steps: int) -> bool:
    from cartlib.train import CKPT_NAME, load_checkpoint

    ckpt = folder / CKPT_NAME
    return ckpt.exists() and load_checkpoint(ckpt)["step"] >= steps


def ensure_tokenizer(cfg, run_dir, progress: bool = True):
    """The trained tokenizer of ``cfg`` in ``run_dir``: loaded when a finished one with the same
    data/decomposition/tokenizer settings is there, else trained (resuming a partial run)."""
    from cartlib import train

    folder = train.tokenizer_dir(resolve_run_dir(run_dir), cfg)
    if _finished(folder, cfg.tokenizer.steps):
        return train.load_tokenizer(folder)
    print(f"training the tokenizer into {folder} ({cfg.tokenizer.steps} steps)")
    tok, _ = train.train_tokenizer(cfg, resolve_run_dir(run_dir), progress=progress)
    return tok


def ensure_tokens(cfg, run_dir, tokenizer, split: str = "train", progress: bool = True):
    """Token maps of a data split, extracted once with ``tokenizer`` and cached next to it.
    -> (tokens list of (N,h_k,w_k), labels (N,), num_classes)"""
    from accelerate import PartialState

    from cartlib import train

    path = train.tokenizer_dir(resolve_run_dir(run_dir), cfg) / f"tokens-{split}.pt"
    with PartialState().main_process_first():  # under a launcher: extracted once, then loaded
        if not path.exists():
            _extract_tokens(cfg, tokenizer, split, path, progress)
    blob = train.load_checkpoint(path)
    return blob["tokens"], blob["labels"], blob["num_classes"]


def _extract_tokens(cfg, tokenizer, split, path, progress):
    from cartlib import train
    from cartlib.data import load_dataset_from_config

    images, bases, labels = train.tokenizer_training_data(cfg, split, progress)
    num_classes = load_dataset_from_config(cfg.data, split, progress=False).num_classes
    tokens = train.extract_tokens(tokenizer, images, bases, progress=progress)
    atomic_torch_save({"tokens": tokens, "labels": labels, "num_classes": num_classes}, path)


def ensure_ar(cfg, run_dir, progress: bool = True):
    """(tokenizer, transformer) of ``cfg``: each loaded if finished, else trained."""
    from cartlib import train

    tok = ensure_tokenizer(cfg, run_dir, progress)
    folder = train.ar_dir(resolve_run_dir(run_dir), cfg)
    if _finished(folder, cfg.ar.steps):
        return tok, train.load_ar(folder, tok)
    tokens, labels, num_classes = ensure_tokens(cfg, run_dir, tok, "train", progress)
    print(f"training the transformer into {folder} ({cfg.ar.steps} steps)")
    model, _ = train.train_ar(
        cfg, resolve_run_dir(run_dir), tok, tokens, labels, num_classes, progress=progress
    )
    return tok, model
