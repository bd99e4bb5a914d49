"""Loading files that someone else wrote, without running their code.

Run folders, data folders and downloaded weights are input, not code: a checkpoint copied from a
cluster's shared disk, a colleague's ``papermill_runs/``, a CIFAR archive. A pickle can name any
callable to run while it loads, and the sha256 manifests beside cartlib's checkpoints check
integrity, not trust (whoever writes the folder writes the manifest). So every pickle cartlib
reads goes through one of two doors, and nothing else in cartlib unpickles:

* :func:`load_torch` — ``torch.load(weights_only=True)``: tensors, dicts, lists, tuples and plain
  numbers (everything cartlib writes since 2026-12-07: the RNG states are stored as tensors and
  ints). Checkpoints written by older cartlib hold numpy's RNG state (an ``ndarray`` of uint32):
  they load when :func:`torch.serialization.get_unsafe_globals_in_checkpoint` lists nothing but
  numpy's array pieces (:data:`LEGACY_NUMPY`), under ``safe_globals`` for exactly those (the
  weights-only unpickler still builds them: an array's contents are unpickled by the same
  restricted unpickler). Anything else is refused with :class:`UnsafeFileError` naming the file
  and the global it wanted.
* :func:`restricted_load` — for pickles in formats cartlib does not write (CIFAR-10's python
  batches, ``torch.distributed.checkpoint``'s ``.metadata``): the standard library's unpickler
  with ``find_class`` limited to an allowlist of (module, name) pairs given by the caller. A
  global outside it is :class:`UnsafeFileError`, raised before anything is called.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import torch

# what numpy's RNG state (np.random.get_state(): ('MT19937', uint32 array, ...)) pickles to, under
# numpy 1.x and 2.x names
LEGACY_NUMPY = frozenset(
    {
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.ndarray",
        "numpy.dtype",
        "numpy.dtypes.UInt32DType",
    }
)


class UnsafeFileError(ValueError):
    """A file would run code (or build objects) that cartlib does not admit when it is loaded;
    the message names the file, what it wanted and what to do. Nothing was executed."""


def _refusal(path: str, wanted: list[str]) -> UnsafeFileError:
    return UnsafeFileError(
        f"{path} was refused: loading it would call {', '.join(sorted(wanted))}, which cartlib "
        "never writes into its files. Nothing from it was run. A file from a source you do not "
        "trust may carry code; if you made it yourself with other software, convert it to plain "
        "tensors (torch.save(model.state_dict(), ...)) in a session that trusts it"
    )


def _numpy_pieces() -> list:
    import numpy as np

    pieces = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return [*pieces, _reconstruct]


def load_torch(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` of ``path`` that never runs code from it (see the module docstring). A file
    that is not a torch file at all raises what torch raises (a RuntimeError or pickle error);
    one that wants globals beyond tensors (and, for older cartlib checkpoints, numpy's RNG
    state) is :class:`UnsafeFileError`."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        try:
            wanted = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # not a zip file torch wrote: the first error says what it is
            raise
        extra = [g for g in wanted if g not in LEGACY_NUMPY]
        if extra:
            raise _refusal(str(path), extra) from None
    with torch.serialization.safe_globals(_numpy_pieces()):
        return torch.load(path, map_location=map_location, weights_only=True)


class _Restricted(pickle.Unpickler):
    def __init__(self, file: BinaryIO, allowed: dict[str, frozenset[str]], name: str, **kw):
        super().__init__(file, **kw)
        self.allowed, self.name = allowed, name

    def find_class(self, module: str, name: str) -> Any:
        if name in self.allowed.get(module, ()):
            return super().find_class(module, name)
        raise _refusal(self.name, [f"{module}.{name}"])


def restricted_load(
    file: str | os.PathLike | BinaryIO | bytes,
    allowed: dict[str, frozenset[str] | set[str]],
    name: str | None = None,
    encoding: str = "ASCII",
) -> Any:
    """Unpickle ``file`` (a path, an open binary file or bytes) admitting only the globals
    ``allowed`` ({module: {names}}); another is :class:`UnsafeFileError` before it is called.
    ``name``: how the message names the file (default: its path). ``encoding``: as
    ``pickle.load`` (``"latin1"`` for Python 2 pickles holding numpy arrays)."""
    allowed = {m: frozenset(n) for m, n in allowed.items()}
    if isinstance(file, (str, os.PathLike)):
        with open(file, "rb") as f:
            return restricted_load(f, allowed, name or str(Path(file)), encoding)
    if isinstance(file, bytes):
        file = io.BytesIO(file)
    name = name or getattr(file, "name", "data")
    return _Restricted(file, allowed, name, encoding=encoding).load()
