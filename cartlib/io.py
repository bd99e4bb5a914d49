"""The ground floor: paths, atomic writes, locks, results.json, checkpoints, seeds, the cache.

Every other module of cartlib may import this one; it imports only the other ground-floor
modules (:mod:`cartlib.hardware`, :mod:`cartlib.trust`). Relative run
directories are resolved against the project root, so a notebook executed from ``notebooks/``
(nbval, Jupyter) and one executed by papermill from the root write to the same place.

Design decisions:

- Writes go to a temp file ``.<name>.<host>-<pid>.<random>.tmp`` in the same folder, are
  fsync'ed, then renamed over the target (and the folder fsync'ed): a crash leaves either the old
  file or the new one, never half of one. A full disk raises :class:`DiskFullError` ("no space
  left on <folder> ..., <n> GB needed") and removes the temp file.
- A writer killed mid-write (SIGKILL, preemption) cannot remove its temp file; the next process
  that takes a lock on that folder (:func:`file_lock`) removes the temp files whose writer is
  gone: same host and no such pid, or another host's file older than :data:`STALE_FOREIGN_S`.
- :func:`file_lock` is an exclusive ``flock`` on a lock file that records the holder (pid, host,
  since, what). The kernel frees it when the holder dies, so a lock is never stale. A second
  writer prints who holds it and waits (``timeout`` or ``$CART_LOCK_TIMEOUT`` seconds; default:
  as long as the holder lives), then raises :class:`LockTimeout` naming the holder. Locks are
  re-entrant within a process. ``results.json`` is read-modified-written under its lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import socket
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cartlib import hardware  # ground floor too: the device this process uses
from cartlib.trust import UnsafeFileError, load_torch  # ground floor: loading without running code

# How long a collective (barrier, broadcast, all-gather) waits for the slowest process before the
# run fails. NCCL's default, 10 minutes, is shorter than waits a full-scale run has: the barrier
# after rank 0 extracts tokens, rank 0 hashing every checkpoint shard or writing a ~32 GB whole
# checkpoint while the others wait. CARTLIB_DIST_TIMEOUT_MIN sets it (minutes).
DIST_TIMEOUT = timedelta(minutes=float(os.environ.get("CARTLIB_DIST_TIMEOUT_MIN", "120")))
STALE_FOREIGN_S = 3600  # another host's temp file older than this, found under a lock, is garbage
_TEMP = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_-]*)-(?P<pid>\d+)\.[^.]+\.tmp$")
_HELD: dict[str, list] = {}  # lock path -> [fd, depth] of the locks this process holds


class DiskFullError(OSError):
    """A write failed for lack of space (errno ENOSPC); the message names the folder and the
    size needed."""

    def __str__(self) -> str:
        return self.strerror


class UnreadableFileError(RuntimeError, ValueError):
    """A file cannot be read (truncated, foreign); the message names it and what to do. (A
    ValueError as well, so that the CLI prints the message without a traceback.)"""


class ReadOnlyError(OSError):
    """A folder that must be written is read-only storage (or not ours); the message says what
    needed to write and what to do."""

    def __str__(self) -> str:
        return self.strerror


class LockTimeout(RuntimeError):
    """Another process held a lock longer than the wait allowed; the message names it."""


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
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"run_dir {path} is a file, not a folder: give a folder (created if missing)"
        )
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(
                f"run_dir {path} cannot be created ({e.strerror}): give a folder you can write, "
                "e.g. one under your home or the project"
            ) from None
    return path


# ------------------------------------------------------------------------------- atomic writes
def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0])


def _temp_file(path: Path) -> tuple[int, str]:
    """An open temp file next to ``path`` whose name says which process writes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.{_host()}-{os.getpid()}."
    return tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: str, path: Path) -> None:
    os.chmod(tmp, _umask_mode())  # mkstemp makes 0600; give the usual permissions
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def disk_full_error(e: BaseException, path: Path, need: int) -> DiskFullError | None:
    """A DiskFullError for a failed write of ``need`` bytes to ``path``, or None if ``e`` is not
    a lack of space: ENOSPC or EDQUOT, raised as such or as the context of torch's "[enforce
    fail at inline_container.cc] unexpected pos" (what torch.save turns it into)."""
    chain = e
    while chain is not None and not (
        isinstance(chain, OSError) and chain.errno in (errno.ENOSPC, errno.EDQUOT)
    ):
        chain = chain.__context__
    if chain is None:
        return None
    free = shutil.disk_usage(path.parent).free
    return DiskFullError(
        errno.ENOSPC,
        f"no space left on {path.parent}, {need / 1e9:.3g} GB needed to write {path.name} "
        f"({free / 1e9:.3g} GB free): free space there or write the run directory (or "
        "$CART_CACHE_DIR for caches) to a larger disk",
    )


def reserve(path: str | os.PathLike, nbytes: int) -> None:
    """Allocate ``nbytes`` on disk for the existing file ``path`` (a memory-mapped file that is
    written later: without it a full disk is a SIGBUS with no message at the first page that
    cannot be stored). DiskFullError, naming the folder and the size, when they are not there;
    the file is removed then."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, nbytes)
        finally:
            os.close(fd)
    except OSError as e:
        path.unlink(missing_ok=True)
        raise (disk_full_error(e, path, nbytes) or e) from e


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash never leaves a half-written file there. A
    symbolic link at ``path`` is written through (its target replaced), not replaced."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    fd, tmp = _temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        raise (disk_full_error(e, path, len(data)) or e) from e


def atomic_symlink(target: str, path: str | os.PathLike) -> None:
    """Point ``path`` at ``target`` (relative to its folder) in one atomic step."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{_host()}-{os.getpid()}.link.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class _HashingWriter:
    """A file object for ``torch.save`` that hashes what it writes (sha256 of the file)."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, b) -> int:
        self.sha.update(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> str:
    """``torch.save`` through a temp file in the same folder, fsync and an atomic rename.
    Returns the file's sha256 (hex), computed while writing."""
    path = Path(path)
    fd, tmp = _temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        raise (disk_full_error(e, path, _payload_bytes(obj)) or e) from e
    return writer.sha.hexdigest()


def _payload_bytes(obj: Any) -> int:
    """Bytes of the tensors and arrays in ``obj`` (shared storages counted once)."""
    seen, total, stack = set(), 0, [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            storage = o.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(o, np.ndarray):
            total += o.nbytes
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
    return total


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files in ``folder`` whose writer is gone (see the module docstring)."""
    removed = []
    for p in Path(folder).glob(".*.tmp"):
        m = _TEMP.match(p.name)
        try:
            if m and m["host"] == _host():
                stale = not _pid_alive(int(m["pid"]))
            else:
                stale = time.time() - p.stat().st_mtime > STALE_FOREIGN_S
            if stale:
                p.unlink()
                removed.append(p)
        except FileNotFoundError:  # its writer finished (renamed it) meanwhile
            continue
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


# -------------------------------------------------------------------------------------- locks
def _holder(lock_path: Path) -> str:
    try:
        h = json.loads(lock_path.read_text())
        return f"pid {h['pid']} on {h['host']} since {h['since']} ({h['what']})"
    except (OSError, ValueError, KeyError):
        return "a process that is just starting"


@contextlib.contextmanager
def file_lock(lock_path: str | os.PathLike, what: str = "", timeout: float | None = None):
    """Hold an exclusive lock on ``lock_path`` (created; see the module docstring). On taking it,
    the stale temp files of its folder are removed."""
    lock_path = Path(lock_path)
    key = str(lock_path.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    if timeout is None and os.environ.get("CART_LOCK_TIMEOUT"):
        timeout = float(os.environ["CART_LOCK_TIMEOUT"])
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        raise ReadOnlyError(
            e.errno,
            f"cannot write in {lock_path.parent} ({os.strerror(e.errno)}): {what or 'this'} "
            "needs to write there. A finished stage on read-only storage can be read (loading "
            "takes no lock); to train or sample, copy the run folder to writable storage or "
            "give another run_dir",
        ) from None
    try:
        _acquire(fd, lock_path, timeout)
        since = datetime.now().astimezone().isoformat(timespec="seconds")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": since, "what": what}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        _HELD[key] = [fd, 1]
        remove_stale_temp_files(lock_path.parent)
        yield
    finally:
        if _HELD.pop(key, None) is not None:
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the last descriptor releases the flock


def _acquire(fd: int, lock_path: Path, timeout: float | None) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    told = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        holder = _holder(lock_path)
        if deadline is not None and time.monotonic() >= deadline:
            raise LockTimeout(
                f"{lock_path.parent} is locked by {holder}: another process is writing there. "
                f"Wait for it to finish or stop it (its lock frees itself when it ends), or use "
                f"another run_dir. Gave up after {timeout:g} s ($CART_LOCK_TIMEOUT sets the wait)"
            )
        if not told:
            wait = "as long as it runs" if deadline is None else f"up to {timeout:g} s"
            print(f"cartlib: {lock_path.parent} is locked by {holder}; waiting {wait}",
                  file=sys.stderr, flush=True)  # fmt: skip
            told = True
        time.sleep(0.1)


def dir_lock(folder: str | os.PathLike, what: str = "", timeout: float | None = None):
    """:func:`file_lock` on ``<folder>/.lock``: held while a stage writes into ``folder``."""
    return file_lock(Path(folder) / ".lock", what, timeout)


# ------------------------------------------------------------------------------- results.json
def save_results(run_dir: str | os.PathLike, section: str, values: dict[str, Any]) -> Path:
    """Merge ``values`` under ``section`` into ``<run_dir>/results.json`` (atomically, under
    ``<run_dir>/.results.lock`` so that concurrent notebooks never lose each other's sections)."""
    run_dir = resolve_run_dir(run_dir)
    path = run_dir / "results.json"
    with file_lock(run_dir / ".results.lock", f"results.json: {section}"):
        try:
            results = json.loads(path.read_text()) if path.exists() else {}
        except ValueError as e:
            raise ValueError(
                f"{path} is not valid JSON ({e}): repair it, or move it away to start a new one "
                "(this notebook's section is then the only one in it)"
            ) from e
        results[section] = {**results.get(section, {}), **values}
        atomic_write_bytes(path, (json.dumps(results, indent=2, default=_jsonable) + "\n").encode())
    return path


def paper_path(run_dir: str | os.PathLike, item: str, model: str, suffix: str) -> Path:
    """``<run_dir>/paper/<item>_<model><suffix>`` (the folder made): where a notebook writes the
    paper's ``item`` (``"fig3"``, ``"table1"``) for the run ``model`` (its config's name)."""
    if not re.fullmatch(r"(fig|table)\d+[a-z]?", item):
        raise ValueError(f"item={item!r}: name the paper's item, e.g. 'fig3' or 'table1'")
    out = resolve_run_dir(run_dir) / "paper"
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9.-]+", "-", model).strip("-") or "model"
    return out / f"{item}_{slug}{suffix}"


def save_paper_row(run_dir: str | os.PathLike, item: str, row: dict[str, Any], model: str) -> Path:
    """Write one row of the paper's table ``item`` (``"table1"``) for the run ``model`` as
    :func:`paper_path`'s ``.md`` (a markdown table: the columns in ``row``'s order, None as "-")
    beside the same row as ``.json``. -> the markdown file"""
    if not item.startswith("table"):
        raise ValueError(f"item={item!r}: name the paper's table, e.g. 'table1'")
    cells = [
        "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()
    ]
    text = f"| {' | '.join(row)} |\n|{'---|' * len(row)}\n| {' | '.join(cells)} |\n"
    md, js = (paper_path(run_dir, item, model, suffix) for suffix in (".md", ".json"))
    atomic_write_bytes(js, json.dumps(row, indent=1, default=_jsonable).encode())
    atomic_write_bytes(md, text.encode())
    return md


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
    """A checkpoint read without running code from it (:func:`cartlib.trust.load_torch`: a file
    that wants more than tensors and plain values is :class:`~cartlib.trust.UnsafeFileError`),
    with a clear error for a truncated or foreign file (nothing is overwritten)."""
    path = Path(path)
    try:
        return load_torch(path)
    except UnsafeFileError:
        raise
    except Exception as e:  # truncated zip, pickle garbage, ...
        raise UnreadableFileError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it is incomplete or not "
            "a cartlib checkpoint. Move it away to start this stage afresh, or restore a copy"
        ) from e


def process_state():
    """accelerate's PartialState of this process (rank, world size, device). On a machine
    without GPUs it must be asked for the CPU explicitly: otherwise processes started by a
    launcher (torchrun) each believe they are alone and do all the work (seen: two processes
    writing the same sample files)."""
    from accelerate import PartialState  # the one accelerate import of the ground floor

    return PartialState(cpu=hardware.device().type == "cpu", timeout=DIST_TIMEOUT)
