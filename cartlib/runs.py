"""Stage artifacts of a run directory: each stage is loaded when a finished one with the same
settings is there, else produced (resuming a partial one) — so every notebook runs on its own and
the series also chains.

Each stage holds the lock of its folder while it checks and writes it (:func:`stage_lock`; the
training loop takes the same lock), so two notebooks or scripts that need the same artifact in one
run directory do not both produce it: the second waits (saying who holds it), then loads it.

A run directory holds ``config.yaml``, checkpoints (written atomically: temp file + rename),
``results.json`` and figures; the ground-floor helpers for them live in :mod:`cartlib.io` and are
re-exported here (``runs.save_results``, ``runs.resolve_run_dir``, ``runs.seed_everything``), the
names the notebooks use.

A finished model opens whatever precision it was trained in: when the run directory (or
:mod:`cartlib.shipped`) has none at the precision this machine trains in (``mixed_precision:
auto`` resolves per machine, :mod:`cartlib.hardware`), a finished one with the same settings at
another precision is used (:func:`settle`). Training anew always keys by this machine's precision.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

from cartlib import launch, stages, train
from cartlib import shipped as shipped_stages
from cartlib.io import (  # noqa: F401  (re-exported for notebooks)
    atomic_torch_save,
    cache_dir,
    dir_lock,
    load_checkpoint,
    process_state,
    project_root,
    resolve_run_dir,
    save_paper_row,
    save_results,
    seed_everything,
)
from cartlib.shards import TokenShards, shard_folder, tokenizer_hash
from cartlib.stages import finished as _finished
from cartlib.stages import settle
from cartlib.train.ar import trained_on
from cartlib.train.checkpoints import (
    NotNewest,
    clear_folder,
    clear_if_installed,
    installed_from,
    needs_repair,
    repair_last,
    stage_state,
)


def stage_lock(folder_of):
    """Decorate ``ensure_x(cfg, run_dir, ...)`` to run holding the lock of the stage folder
    ``folder_of(run_dir, cfg)`` (only the main process takes it under a launcher: the others
    write nothing)."""

    def wrap(fn):
        @functools.wraps(fn)
        def locked(cfg, run_dir, *args, **kwargs):
            folder = folder_of(resolve_run_dir(run_dir), cfg)
            main = process_state().is_main_process
            with dir_lock(folder, fn.__name__) if main else contextlib.nullcontext():
                return fn(cfg, run_dir, *args, **kwargs)

        return locked

    return wrap


def _use_shipped(stage: str, cfg, run_dir, folder: Path, shipped: bool | None, tokenizer=None):
    """``shipped`` True: install the checkpoint cartlib ships for these settings when the run
    directory has none of this stage; False: empty a folder installed from one (train instead);
    None: neither (:mod:`cartlib.shipped`)."""
    if shipped is False:
        clear_if_installed(folder)
    elif shipped and stage_state(folder, 0).status == "missing":
        shipped_stages.install(stage, cfg, run_dir, tokenizer)


@contextlib.contextmanager
def _resumed_if_damaged():
    """Around loading a finished stage: a damaged newest checkpoint (:class:`NotNewest`) is said,
    and the caller goes on to train, which resumes from the older one and saves a good newest."""
    try:
        yield
    except NotNewest as e:
        print(f"{e}\n-> training it again from the older checkpoint", flush=True)


def ensure_tokenizer(cfg, run_dir, progress: bool = True, shipped: bool | None = None):
    """The trained tokenizer of ``cfg`` in ``run_dir``: loaded when a finished one with the same
    data/decomposition/tokenizer settings is there (at any precision, :func:`settle`), else
    trained (resuming a partial run). ``shipped``: see :func:`_use_shipped`."""
    cfg = settle("tokenizer", cfg, run_dir, shipped)
    return _read_finished("tokenizer", cfg, run_dir, shipped) or _ensure_tokenizer(
        cfg, run_dir, progress, shipped
    )


def _read_finished(stage: str, cfg, run_dir, shipped: bool | None, tokenizer=None):
    """The finished ``stage`` of ``cfg`` read without taking its folder's lock (reading writes
    nothing: a finished run on read-only storage opens), or None when it is not there as asked
    (not finished, damaged, or installed where ``shipped=False`` asks to train): then the
    caller takes the lock, looks again and produces it."""
    folder = (train.tokenizer_dir if stage == "tokenizer" else train.ar_dir)(
        resolve_run_dir(run_dir, create=False), cfg
    )
    steps = cfg.tokenizer.steps if stage == "tokenizer" else cfg.ar.steps
    state = stage_state(folder, steps)
    if not state.finished or (shipped is False and state.status == "installed"):
        return None
    if needs_repair(folder):  # a dangling last.pt: repaired under the lock
        return None
    if stage == "ar" and installed_from(folder) and trained_on(folder) != tokenizer_hash(tokenizer):
        return None  # installed on a shipped tokenizer replaced since: retrained under the lock
    try:
        return (
            train.load_tokenizer(folder)
            if stage == "tokenizer"
            else train.load_ar(folder, tokenizer)
        )
    except NotNewest:
        return None  # the locked path says so and resumes from the older checkpoint


@stage_lock(train.tokenizer_dir)
def _ensure_tokenizer(cfg, run_dir, progress: bool = True, shipped: bool | None = None):
    folder = train.tokenizer_dir(resolve_run_dir(run_dir), cfg)
    _use_shipped("tokenizer", cfg, run_dir, folder, shipped)
    if _finished(folder, cfg.tokenizer.steps):
        repair_last(folder)
        with _resumed_if_damaged():
            return train.load_tokenizer(folder)
    print(f"training the tokenizer into {folder} ({cfg.tokenizer.steps} steps)")
    tok, _ = train.train_tokenizer(cfg, resolve_run_dir(run_dir), progress=progress)
    return tok


def ensure_tokens(cfg, run_dir, tokenizer, split: str = "train", progress: bool = True):
    """The token shards of a data split (:mod:`cartlib.shards`), extracted with ``tokenizer``
    (the one :func:`ensure_tokenizer` gave for ``cfg``) next to it when they are not there
    (resuming unfinished shards; under a launcher every process encodes its share), checked
    and memory-mapped. -> (TokenShards, labels (N,), num_classes)"""
    return _ensure_tokens(settle("tokenizer", cfg, run_dir), run_dir, tokenizer, split, progress)


@stage_lock(train.tokenizer_dir)
def _ensure_tokens(cfg, run_dir, tokenizer, split: str = "train", progress: bool = True):
    run_dir = resolve_run_dir(run_dir)
    folder = shard_folder(train.tokenizer_dir(run_dir, cfg), split)
    if (folder / "manifest.json").exists():  # checked against the data as it is now
        rebuild = stages.extract_command(cfg, run_dir, split)
        identity = stages.current_identity(cfg, split)
        shards = TokenShards(folder, tokenizer_hash(tokenizer), rebuild, identity)
    else:
        shards = stages.extract_shards(cfg, run_dir, tokenizer, split, progress=progress)
    return shards, shards.labels, shards.num_classes


def ensure_ar(
    cfg, run_dir, progress: bool = True, shipped: bool | None = None, stop_after: int | None = None
):
    """(tokenizer, transformer) of ``cfg``: each loaded if finished (at any precision,
    :func:`settle`), else trained. ``shipped`` True: a stage the run directory lacks comes from
    :mod:`cartlib.shipped` when cartlib ships it (the transformer only on top of its own
    tokenizer); False: installed ones are replaced by training (see :func:`_use_shipped`).
    ``stop_after``: train at most that many steps now (checkpointed; the next call resumes)."""
    tok_cfg = settle("tokenizer", cfg, run_dir, shipped)
    tok = _read_finished("tokenizer", tok_cfg, run_dir, shipped) or _ensure_tokenizer(
        tok_cfg, run_dir, progress, shipped
    )
    ar_cfg = settle("ar", cfg, run_dir, shipped, tok)
    model = _read_finished("ar", ar_cfg, run_dir, shipped, tok)
    if model is not None:
        return tok, model
    return _ensure_ar(ar_cfg, run_dir, progress, shipped, tok_cfg, tok, stop_after)


@stage_lock(train.ar_dir)
def _ensure_ar(cfg, run_dir, progress, shipped, tok_cfg, tok, stop_after=None):
    folder = train.ar_dir(resolve_run_dir(run_dir), cfg)
    _use_shipped("ar", cfg, run_dir, folder, shipped, tok)
    state = process_state()
    if installed_from(folder) is not None and trained_on(folder) != tokenizer_hash(tok):
        # installed on a shipped tokenizer that was replaced since: trained anew below (one
        # process empties it: on a shared disk the others would race it)
        if state.is_main_process:
            clear_folder(folder, "its tokenizer is no longer the shipped one it was trained with")
        state.wait_for_everyone()
    if _finished(folder, cfg.ar.steps):
        repair_last(folder)
        with _resumed_if_damaged():
            return tok, train.load_ar(folder, tok)
    tokens, labels, num_classes = _ensure_tokens(tok_cfg, run_dir, tok, "train", progress)
    print(f"training the transformer into {folder} ({cfg.ar.steps} steps)")
    model, _ = train.train_ar(
        cfg, resolve_run_dir(run_dir), tok, tokens, labels, num_classes, progress, stop_after
    )
    return tok, model


def plan_ar(cfg, run_dir, cluster=None, write: bool = True):
    """:func:`cartlib.launch.plan_ar`, with mode ``finished`` when the run directory already
    holds the finished transformer (and its tokenizer) of ``cfg``: it opens here, on a login
    node or a machine with fewer GPUs than the plan wants, instead of being launched again."""
    plan = launch.plan_ar(cfg, run_dir, cluster, write)
    tok_cfg = settle("tokenizer", cfg, run_dir)
    tok_dir = train.tokenizer_dir(resolve_run_dir(run_dir), tok_cfg)
    tok_done = stage_state(tok_dir, tok_cfg.tokenizer.steps)
    ar_cfg = settle("ar", plan.config or cfg, run_dir)
    ar_done = stage_state(train.ar_dir(resolve_run_dir(run_dir), ar_cfg), ar_cfg.ar.steps)
    if tok_done.finished and ar_done.finished:
        plan.mode, plan.problems = "finished", []
    return plan


def model_origin(cfg, run_dir, shipped: bool | None = None, tokenizer=None, stage="ar") -> str:
    """Where the model :func:`ensure_ar` (``stage="ar"``, the transformer) or
    :func:`ensure_tokenizer` (``stage="tokenizer"``) returned for these arguments came from, in
    words (notebooks print it, so a reader knows whose model they look at): its stage folder, and
    whether cartlib's shipped checkpoint was installed there or it was trained in ``run_dir``."""
    if stage not in ("ar", "tokenizer"):
        raise ValueError(f"stage={stage!r}: choose 'ar' or 'tokenizer'")
    folder_of = train.ar_dir if stage == "ar" else train.tokenizer_dir
    folder = folder_of(resolve_run_dir(run_dir), settle(stage, cfg, run_dir, shipped, tokenizer))
    src = installed_from(folder)
    if src is not None:
        return f"{folder}: cartlib's shipped checkpoint ({src['source']}), not trained here"
    return f"{folder}: trained in this run directory"
