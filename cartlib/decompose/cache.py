"""On-disk cache of base-detail decompositions, so tokenizer training never recomputes them.

:func:`decompose_dataset` computes the bases B_1..B_n (Eq. 6) of every image of a dataset once and
stores them in ``cartlib.runs.cache_dir("decompose")`` (``$CART_CACHE_DIR/decompose`` or
``~/.cache/cartlib/decompose``); :class:`DecomposedDataset` wraps a dataset and yields
``(image, bases (n, 3, H, W), label)`` from that file. The details follow as D_k = B_{k-1} - B_k.

Design decisions:

- The file name carries a hash of everything that changes the result: the dataset's identity
  (its ``key`` from :mod:`cartlib.data`: name, split, resolution, number of items, or an explicit
  ``name=``), ``limit``, ``order``, ``alpha``, ``lam``, the resolved ``eps``, the solver settings
  and :data:`~cartlib.decompose.mumford_shah.SOLVER_VERSION`.
- Bases are stored as float16 (half the bytes of float32). The images are 8-bit (steps of
  1/255 = 3.9e-3); float16 rounds values in [0, 1] by at most 2.4e-4, and a detail D_k
  recomputed from two stored bases is off by at most 4.9e-4 (rms ~1e-4, tested). Grey datasets
  (all channels equal, e.g. Fashion-MNIST) store one channel, 3x smaller, expanded on read.
- The file also stores the content signature of the data it covers (the dataset's
  ``content_signature(n)``: size and mtime_ns of every file of an image folder, a hash of an
  in-memory dataset's pixels) and a fingerprint of a few images. A file whose signature or
  fingerprint differs from the dataset's now (an image was edited, replaced or added), or that
  cannot be read (truncated, corrupt, written by another version), is recomputed with a warning
  that names the file and the reason.
- Files are written atomically (temp file + rename) under a lock of their own
  (``.<file>.lock``), so two processes that need the same decomposition compute it once: the
  second waits, then reads the first one's file. Reading a usable file takes no lock.
- Resumable per part: while computing, every :data:`PART_BATCHES` batches are saved to
  ``.<file stem>.parts/part-<first item>.pt`` (with the key, the content signature and the batch
  size, so a part of other data or other batches is computed again); a killed computation
  resumes from the parts it finished, in the same batches, so it ends with the file an
  uninterrupted one writes. The parts are removed once the file is written.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from cartlib.decompose.hierarchy import base_detail
from cartlib.decompose.mumford_shah import SOLVER_VERSION, check_params
from cartlib.io import atomic_torch_save, cache_dir, file_lock

CACHE_FORMAT = 2  # layout of the cache file (2: with the content signature)
N_FINGERPRINT = 4  # images stored in the file to check it belongs to the dataset
PART_BATCHES = 4  # batches per resumable part (64 images each by default)


def _dataset_id(dataset, name: str | None) -> str:
    ident = name or getattr(dataset, "key", None)
    if not ident:
        raise ValueError(
            f"cannot identify a {type(dataset).__name__} in the decomposition cache: pass "
            "name='<something unique to these images>' (datasets from cartlib.data.load_dataset "
            "carry a .key)"
        )
    return str(ident)


def cache_key(dataset, order, alpha, lam, eps, limit=None, name=None, **solver) -> dict:
    """Everything the cached bases depend on (its hash names the cache file)."""
    return {
        "dataset": _dataset_id(dataset, name),
        "limit": limit,
        "order": order,
        "alpha": float(alpha),
        "lam": float(lam),
        "eps": check_params(alpha, lam, eps),
        "solver": {"version": SOLVER_VERSION, **dict(sorted(solver.items()))},
        "format": CACHE_FORMAT,
    }


def cache_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", key["dataset"])[:80]
    return cache_dir("decompose") / f"{stem}-o{key['order']}-{digest}.pt"


def _fingerprint_ids(n: int) -> list[int]:
    return sorted({round(i * (n - 1) / max(1, N_FINGERPRINT - 1)) for i in range(N_FINGERPRINT)})


def _fingerprint(dataset, n: int) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in _fingerprint_ids(n)]).half()


def content_signature(dataset, n: int) -> str | None:
    """The dataset's signature of the content of its first ``n`` items, None if it has none
    (then only the fingerprint images are checked)."""
    sign = getattr(dataset, "content_signature", None)
    return sign(n) if sign is not None else None


def _compute(
    dataset, n, order, at_params, batch_size, device, progress, parts=None
) -> torch.Tensor:
    """The bases of items 0..n-1 as float16 (n, order, C, H, W), C = 1 when all are grey.
    ``parts``: (folder, stamp) to save each part into and resume finished parts from."""
    chunks, size = [], batch_size * PART_BATCHES
    bar = tqdm(total=n, desc=f"decompose (order {order})", unit="img", disable=not progress)
    reused = 0
    for first in range(0, n, size):
        count = min(size, n - first)
        bases = _load_part(*parts, first, count) if parts else None
        reused += bases is not None
        if bases is None:
            bases = torch.cat([
                _decompose(dataset, range(s, min(first + count, s + batch_size)), order,
                           at_params, device)
                for s in range(first, first + count, batch_size)
            ])  # fmt: skip
            if (bases == bases[:, :, :1]).all():  # grey: one channel stored
                bases = bases[:, :, :1].clone()
            if parts:
                folder, stamp = parts
                folder.mkdir(parents=True, exist_ok=True)
                part = {**stamp, "first": first, "count": count, "bases": bases}
                atomic_torch_save(part, folder / f"part-{first:09d}.pt")
        chunks.append(bases)
        bar.update(count)
    bar.close()
    if reused:
        print(f"decomposition resumed: {reused} of {len(chunks)} parts were computed before")
    if all(c.shape[2] == 1 for c in chunks):
        return torch.cat(chunks)
    return torch.cat([c.expand(-1, -1, 3, -1, -1) for c in chunks])


def _decompose(dataset, items: range, order: int, at_params: dict, device) -> torch.Tensor:
    """The bases of ``items``, float16 (b, order, 3, H, W) on the CPU."""
    x = torch.stack([dataset[i][0] for i in items])
    x = x.to(device=device, dtype=torch.float32)  # (b, 3, H, W)
    return torch.stack(base_detail(x, order, **at_params).bases, 1).half().cpu()


def _load_part(folder: Path, stamp: dict, first: int, count: int) -> torch.Tensor | None:
    """The bases of a finished part, or None when it is missing, unreadable or of other data."""
    path = folder / f"part-{first:09d}.pt"
    if not path.is_file():
        return None
    try:
        part = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a part cut short by a kill: computed again
        return None
    if not isinstance(part, dict) or {k: part.get(k) for k in stamp} != stamp:
        return None
    if (part.get("first"), part.get("count")) != (first, count):
        return None
    bases = part.get("bases")
    if not isinstance(bases, torch.Tensor) or len(bases) != count or not bases.isfinite().all():
        return None
    return bases


def _load(path: Path, key: dict, expect: torch.Tensor, content: str | None):
    """The cached bases, or None (with a warning saying why) when the file is unusable."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, unpickling error, EOF, ...: all mean "unreadable"
        reason = f"it cannot be read ({type(e).__name__}: {str(e)[:120]})"
    else:
        reason = _mismatch(obj, key, expect, content)
        if reason is None:
            return obj["bases"]
    warnings.warn(f"decomposition cache {path} is unusable: {reason}; recomputing it", stacklevel=3)
    return None


def _mismatch(obj, key: dict, expect: torch.Tensor, content: str | None) -> str | None:
    if not isinstance(obj, dict) or not {"key", "bases", "fingerprint", "content"} <= obj.keys():
        return "it is not a decomposition cache file"
    if obj["key"] != key:
        return "it was written for other settings"
    if obj["content"] != content:
        return "the images it covers changed since it was written (their content signature differs)"
    bases, fp = obj["bases"], obj["fingerprint"]
    if bases.dim() != 5 or bases.shape[1] != key["order"] or bases.dtype != torch.float16:
        return f"its bases have shape {tuple(bases.shape)} and dtype {bases.dtype}"
    if fp.shape != expect.shape or (fp.float() - expect.float()).abs().max() > 1e-3:
        return "its fingerprint images differ from this dataset's (the data changed)"
    if not torch.isfinite(bases).all():
        return "it holds NaN or inf values"
    return None


def decompose_dataset(
    dataset,
    order: int = 3,
    alpha: float = 1.0,
    lam: float = 0.01,
    eps: float | None = None,
    *,
    limit: int | None = None,
    name: str | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = True,
    cache: bool = True,
    **solver,
) -> torch.Tensor:
    """The bases B_1..B_n of the first ``limit`` (default: all) items of ``dataset``, computed once
    and cached on disk (see the module docstring). -> float16 (N, order, 3, H, W) on the CPU.

    ``dataset`` yields ``(image (3, H, W) in [0, 1], label)``; ``name`` identifies it when it has
    no ``key`` attribute; ``solver`` are further :func:`ambrosio_tortorelli` settings (they join
    the cache key); ``device`` is where the decomposition runs (default: CPU); ``cache=False``
    computes without reading or writing the cache.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r} must be a positive integer or None (all items)")
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if isinstance(order, bool) or not isinstance(order, int) or order < 0:
        raise ValueError(f"order={order!r} must be an integer >= 0 (the paper uses 3)")
    key = cache_key(dataset, order, alpha, lam, eps, limit, name, **solver)
    if order == 0 or n == 0:
        c, h, w = dataset[0][0].shape if n else (3, 0, 0)
        return torch.zeros(n, 0, c, h, w, dtype=torch.float16)
    at_params = {"alpha": alpha, "lam": lam, "eps": eps, **solver}
    fingerprint = _fingerprint(dataset, n)
    if not cache:
        bases = _compute(dataset, n, order, at_params, batch_size, device, progress)
        return bases.expand(-1, -1, fingerprint.shape[1], -1, -1)
    path, content = cache_path(key), content_signature(dataset, n)
    seen = _stat(path)
    bases = _load(path, key, fingerprint, content) if seen else None  # readers take no lock
    if bases is None:
        with file_lock(path.with_name(f".{path.name}.lock"), f"decomposing {key['dataset']}"):
            if _stat(path) not in (seen, None):  # written by another process while we waited
                bases = _load(path, key, fingerprint, content)
            if bases is None:
                parts = path.with_name(f".{path.stem}.parts")
                stamp = {"key": key, "content": content, "batch_size": batch_size}
                bases = _compute(
                    dataset, n, order, at_params, batch_size, device, progress, (parts, stamp)
                )
                blob = {"key": key, "bases": bases, "fingerprint": fingerprint, "content": content}
                atomic_torch_save(blob, path)
                shutil.rmtree(parts, ignore_errors=True)
    return bases.expand(-1, -1, fingerprint.shape[1], -1, -1)


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class DecomposedDataset(Dataset):
    """``dataset`` with the cached bases of each image: items ``(image, bases, label)``, bases a
    float32 (order, 3, H, W) tensor [B_1, ..., B_n] (what the tokenizer encodes, Eq. 7).

    The decomposition runs (or is loaded from the cache) at construction; arguments as for
    :func:`decompose_dataset`.
    """

    def __init__(self, dataset, order: int = 3, alpha=1.0, lam=0.01, eps=None, **kwargs):
        self.dataset, self.order = dataset, order
        self.bases = decompose_dataset(dataset, order, alpha, lam, eps, **kwargs)
        self.key = f"{_dataset_id(dataset, kwargs.get('name'))}-o{order}"
        self.classes = getattr(dataset, "classes", None)
        self.num_classes = getattr(dataset, "num_classes", None)

    def __len__(self) -> int:
        return len(self.bases)

    def __getitem__(self, i: int):
        image, label = self.dataset[i]
        return image, self.bases[i].float(), label
