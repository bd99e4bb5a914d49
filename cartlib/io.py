"""The ground floor: paths, atomic writes, results.json, checkpoint reading, seeds, the cache.

Every other module of cartlib may import this one; it imports nothing of cartlib. Relative run
directories are resolved against the project root, so a notebook executed from ``notebooks/``
(nbval, Jupyter) and one executed by papermill from the root write to the same place.
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


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load with a clear error for a truncated or foreign file (nothing is overwritten)."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, pickle garbage, ...
        raise RuntimeError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it is incomplete or not "
            "a cartlib checkpoint. Move it away to start this stage afresh, or restore a copy"
        ) from e
