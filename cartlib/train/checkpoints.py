"""Checkpoints of a training stage: the last ``keep`` kept, each with its sha256 in a manifest.

A stage folder holds ``step-<step>.pt`` files, ``checkpoints.json`` (newest first: file, step,
sha256, bytes) and ``last.pt``, a relative symlink to the newest, which is what readers outside
the loop open. A save writes the new file (temp file, fsync, rename), then the manifest (atomic),
then swings ``last.pt`` (atomic), then deletes the files the manifest no longer lists; a crash at
any point leaves every listed file complete and ``last.pt`` pointing at one of them.

Loading (:func:`load_latest`) checks each listed file's sha256 before unpickling it, newest
first: a truncated file, a bit flip in the weights or a missing file is skipped with a warning
that names it and says which checkpoint is used instead; when none is usable the error lists why.
That fallback is for resuming (it costs ``ckpt_every`` steps, not the stage). A finished stage's
weights are read with ``fallback=False``: an unusable newest checkpoint is then an error, as
the stage is not finished any more (training it again resumes from the older one and repairs
it), never an older model handed out as the finished one. ``last.pt`` is derived from the
manifest: the loader does not need it, and :func:`repair_last` points it at the newest
checkpoint again when it dangles. A folder without a manifest (written before it existed) is read
from ``last.pt`` unchecked.

Under FSDP a checkpoint is that file (step, history, schedulers, RNG; whole weights only when it
ends a training run: the consolidated export) plus a folder ``step-<step>.dcp`` of
``torch.distributed.checkpoint`` shards of the weights and optimizer moments, one file per rank
(:mod:`cartlib.train.sharded`). The folder is written complete under a temporary name and
renamed before the manifest lists it with every shard's sha256; the shards are checked only by
readers that need them (resuming: ``load_latest(..., shards=True)``), not by those that read the
weights of a finished stage.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cartlib.config import NOT_IN_KEYS_OF, STAGE_FOLDER, load_config
from cartlib.io import (
    atomic_symlink,
    atomic_torch_save,
    atomic_write_bytes,
    load_checkpoint,
    sha256_file,
)

CKPT_NAME = "last.pt"
HISTORY = "history.json"  # the loss history as of the newest checkpoint (also inside it)
MANIFEST = "checkpoints.json"
KEEP = 2  # checkpoints kept: a corrupt newest one costs ckpt_every steps, not the stage
INSTALLED = "shipped.json"  # in a stage folder installed from cartlib.shipped, not trained here


class CheckpointError(RuntimeError, ValueError):
    """A stage folder's checkpoints cannot be used; the message names the file and what to do.
    (A ValueError as well, so that the CLI prints the message without a traceback.)"""


class NotNewest(FileNotFoundError):
    """The newest checkpoint of a finished stage is unusable (``load_latest(fallback=False)``)."""


def installed_from(folder: str | Path) -> dict[str, Any] | None:
    """What a stage folder installed from :mod:`cartlib.shipped` records (source, sha256s), or
    None when the folder was trained here (or is empty)."""
    path = Path(folder) / INSTALLED
    return json.loads(path.read_text()) if path.is_file() else None


def clear_folder(folder: str | Path, why: str) -> None:
    """Empty a stage folder (checkpoints, samples, token shards; its lock file stays, the
    caller may hold it), saying ``why``."""
    folder = Path(folder)
    print(f"clearing {folder}: {why}")
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        if p.name != ".lock":
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def clear_if_installed(folder: str | Path) -> bool:
    """Before training into ``folder``: a checkpoint installed from :mod:`cartlib.shipped` is not
    resumed (it has no optimizer state, and training was asked for); the folder is emptied.
    True when it was one."""
    found = installed_from(folder)
    if found is not None:
        clear_folder(folder, f"it holds the shipped checkpoint {found['source']}; training anew")
    return found is not None


def read_manifest(folder: Path) -> list[dict[str, Any]] | None:
    """The manifest's entries (newest first), or None when the folder has none."""
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())["checkpoints"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(
            f"{path} cannot be read ({type(e).__name__}: {e}). Remove it to read the stage "
            f"from {CKPT_NAME} without checksums (the checkpoint files stay), or move the "
            "folder away to start this stage afresh"
        ) from e


@dataclass(frozen=True)
class StageState:
    """What a stage folder holds, read from its manifest without unpickling or hashing anything
    (:func:`stage_state`): ``status`` is ``missing`` (no checkpoint), ``resumable`` (fewer steps
    than asked for), ``finished`` (trained here to at least the steps asked for) or
    ``installed`` (a finished checkpoint installed from :mod:`cartlib.shipped` or VAR's files);
    ``step`` is the newest checkpoint's step (0 when missing)."""

    status: str
    step: int = 0

    @property
    def finished(self) -> bool:
        return self.status in ("finished", "installed")


def stage_state(folder: str | Path, steps: int) -> StageState:
    """The state of the stage folder ``folder`` for a run of ``steps`` steps: the one answer the
    CLI, the notebooks' loaders and the rehearsal ask. The newest manifest entry counts when its
    file is there at the size written (the loader checks its sha256 when it reads it and refuses
    a damaged one); a folder written before manifests existed is answered by reading its
    ``last.pt``."""
    folder = Path(folder)
    entries = read_manifest(folder)
    if entries is None:
        found = load_latest(folder)
        step = found[0]["step"] if found is not None else None
    else:  # the newest entry whose file is there (a missing or cut newest one: the one before)
        ok = (e["step"] for e in entries if _size_ok(folder / e["file"], e["bytes"]))
        step = next(ok, None)
    if step is None:
        return StageState("missing")
    if step < steps:
        return StageState("resumable", step)
    return StageState("installed" if installed_from(folder) else "finished", step)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _differences(old_path: Path, new: dict, speed: set[str], layout: bool, most=4) -> str:
    """``a.b: x -> y`` for the settings (flattened) of the config file ``old_path`` that differ
    from ``new``'s: those of ``speed`` (``layout``) or the others; at most ``most`` of them.
    "" when the file cannot be read."""
    try:
        old = _flat(load_config(old_path).to_dict())
    except (OSError, ValueError):
        return ""
    new = _flat(new)
    diff = [f"{k}: {old.get(k)} -> {new.get(k)}" for k in sorted(new)
            if old.get(k) != new.get(k) and (k in speed) == layout]  # fmt: skip
    return ", ".join(diff[:most]) + (f" (+{len(diff) - most} more)" if len(diff) > most else "")


def start_notes(folder: str | Path, cfg) -> dict[str, str]:
    """What a run training into the stage folder ``folder`` with ``cfg`` says beside "resuming"
    or "starting" (:func:`cartlib.train.loop.run_loop`); call it before the folder's config.yaml
    is rewritten. ``layout``: the settings that change how, not what, it computes and differ from
    the run it resumes (e.g. ``ar.micro_batch: 8 -> 4``); ``others``: the other folders of this
    stage in the run directory that hold a run, with the settings they differ in — the partial
    run a changed ``lr`` or ``steps`` left next to a new folder."""
    folder, notes = Path(folder), {}
    new = cfg.resolved().to_dict()
    speed = {f"{s}.{n}" for s, names in NOT_IN_KEYS_OF.items() for n in names}
    if (folder / "config.yaml").is_file():
        notes["layout"] = _differences(folder / "config.yaml", new, speed, layout=True)
    named = STAGE_FOLDER.fullmatch(folder.name)
    others = []
    for other in sorted(folder.parent.glob(f"{named['stage']}-*")) if named else []:
        entries = read_manifest(other) if other != folder and other.is_dir() else None
        if not entries or not (other / "config.yaml").is_file():
            continue
        diff = _differences(other / "config.yaml", new, speed, layout=False)
        others.append(f"{other.name} holds step {entries[0]['step']} with other settings ({diff})")
    if others:
        notes["others"] = "; ".join(others[:3])
    return notes


def _size_ok(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


def read_history(folder: str | Path) -> list[dict[str, float]]:
    """The loss history of the stage folder ``folder`` (one entry per step, or per interval on
    long runs: :data:`cartlib.train.loop.MAX_HISTORY`): ``history.json``, written with every
    checkpoint, or the newest checkpoint's when a folder has none (nothing else is read)."""
    path = Path(folder) / HISTORY
    if path.is_file():
        return json.loads(path.read_text())
    found = load_latest(folder)
    return found[0]["history"] if found is not None else []


def save_checkpoint(
    folder: str | Path,
    state: dict[str, Any],
    keep: int = KEEP,
    shards: dict[str, dict[str, Any]] | None = None,
) -> Path:
    """Write ``state`` (holding its ``step``) as the newest checkpoint of ``folder``; keep the
    newest ``keep`` and their checksums. ``shards``: {file: {sha256, bytes}} of the complete
    folder ``state["sharded"]`` (FSDP) that belongs to it. Returns the new file's path."""
    folder = Path(folder)
    name = f"step-{state['step']:08d}.pt"
    sha = atomic_torch_save(state, folder / name)
    entry = {
        "file": name,
        "step": state["step"],
        "sha256": sha,
        "bytes": (folder / name).stat().st_size,
    }
    if shards is not None:
        entry["shards"] = {"dir": state["sharded"], "files": shards}
    old = [e for e in read_manifest(folder) or [] if e["file"] != name]
    entries = [entry, *old][:keep]
    atomic_write_bytes(folder / MANIFEST, json.dumps({"checkpoints": entries}, indent=1).encode())
    atomic_symlink(name, folder / CKPT_NAME)
    kept = {e["file"] for e in entries} | {e["shards"]["dir"] for e in entries if "shards" in e}
    for p in [*folder.glob("step-*.pt"), *folder.glob("step-*.dcp")]:
        if p.name not in kept:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    return folder / name


def _file_problem(path: Path, sha256: str, size: int) -> str | None:
    """Why ``path`` is not the file of that sha256 and size, or None."""
    if not path.is_file():
        return "it is missing"
    if path.stat().st_size != size:
        return f"it has {path.stat().st_size} bytes, {size} were written (truncated or overwritten)"
    if sha256_file(path) != sha256:
        return f"its sha256 differs from the one in {MANIFEST} (corrupted on disk)"
    return None


def _problem(folder: Path, entry: dict[str, Any], shards: bool) -> str | None:
    """Why the checkpoint of manifest ``entry`` is unusable (its file, and its shards when
    ``shards``), or None."""
    reason = _file_problem(folder / entry["file"], entry["sha256"], entry["bytes"])
    if reason is None and shards and "shards" in entry:
        sub = folder / entry["shards"]["dir"]
        for name, f in sorted(entry["shards"]["files"].items()):
            if why := _file_problem(sub / name, f["sha256"], f["bytes"]):
                return f"its shard {sub / name}: {why}"
    return reason


def load_latest(
    folder: str | Path, shards: bool = False, fallback: bool = True
) -> tuple[dict[str, Any], Path] | None:
    """(state, path) of the newest usable checkpoint of ``folder``, or None when it has none;
    see the module docstring for checks and fallback. ``shards``: also check the FSDP shards
    (to resume from them). ``fallback=False``: the newest checkpoint or :class:`NotNewest`."""
    folder = Path(folder)
    entries = read_manifest(folder)
    if entries is None:
        last = folder / CKPT_NAME
        if last.is_symlink() and not last.exists():
            raise CheckpointError(
                f"{last} links to {last.readlink()}, which is missing, and {folder} has no "
                f"{MANIFEST} to find another checkpoint: restore that file, or move the folder "
                "away to train this stage afresh"
            )
        return (load_checkpoint(last), last) if last.exists() else None
    bad = []
    for entry in entries:
        path = folder / entry["file"]
        reason = _problem(folder, entry, shards)
        if reason is None:
            try:
                state = load_checkpoint(path)
            except RuntimeError as e:
                reason = str(e.__cause__ or e)
            else:
                if bad:
                    warnings.warn(
                        f"{'; '.join(bad)}; using {path} (step {entry['step']}) instead",
                        stacklevel=2,
                    )
                return state, path
        bad.append(f"checkpoint {path} is unusable: {reason}")
        if not fallback and len(entries) > 1:
            raise NotNewest(
                f"{bad[0]}; the older {entries[1]['file']} (step {entries[1]['step']}) is not "
                "the model this stage finished with"
            )
    raise CheckpointError(
        f"no usable checkpoint in {folder}: {'; '.join(bad) or 'the manifest lists none'}. "
        "Move the folder away to start this stage afresh, or restore a copy"
    )


def needs_repair(folder: str | Path) -> bool:
    """Whether ``last.pt`` does not point at the newest checkpoint the manifest lists (which is
    there): a dangling or hand-edited link, for :func:`repair_last`."""
    folder = Path(folder)
    entries = read_manifest(folder)
    if not entries or not (folder / entries[0]["file"]).is_file():
        return False
    last = folder / CKPT_NAME
    return not (last.is_symlink() and str(last.readlink()) == entries[0]["file"])


def repair_last(folder: str | Path) -> bool:
    """Point ``last.pt`` at the newest checkpoint the manifest lists when it points elsewhere
    or nowhere (a dangling link: the file deleted or the link edited by hand); call holding the
    folder's lock, after that checkpoint verified. True when it was repaired (said on stdout)."""
    folder = Path(folder)
    if not needs_repair(folder):
        return False
    last, name = folder / CKPT_NAME, read_manifest(folder)[0]["file"]
    was = f"a link to {last.readlink()}" if last.is_symlink() else (
        "a file" if last.exists() else "missing")  # fmt: skip
    atomic_symlink(name, last)
    print(f"repaired {last}: it was {was}; it points at the newest checkpoint {name} again")
    return True
