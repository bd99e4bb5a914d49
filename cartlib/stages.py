"""The stages of a full-scale run that are not training: token extraction and sampling for FID.

Both run in-process or under ``accelerate launch`` (``python -m cartlib extract-tokens|sample``)
and split their work into fixed units handed out round-robin to the processes (shard k or chunk
c goes to process k mod P). A unit is always computed whole, in the same batches, so the files
do not depend on the number of processes, and a unit whose files exist is skipped: a killed job
resumes where it stopped and ends with the same files.

- :func:`extract_shards` encodes every view of every image of a split (Alg. 1) into the token
  shards of :mod:`cartlib.shards`: decode + augment in DataLoader workers, the decomposition
  (Eq. 6) on the device per batch (or from the on-disk cache for small datasets), the encoder.
- :func:`sample_images` draws ``per_class`` samples of every class (the paper's FID protocol:
  50 x 1000) in chunks of ``batch`` images with one seed per chunk, writes them as PNGs (one per
  image, written atomically) and packs the ADM evaluator's ``samples.npz`` (``arr_0`` uint8
  (N, H, W, 3)) from them, streamed: neither holds all images in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm.auto import tqdm

from cartlib import launch, train
from cartlib import shipped as shipped_stages
from cartlib.cluster import Cluster, launch_args, stage_command
from cartlib.config import STAGE_FOLDER, ConfigError, load_config, save_config
from cartlib.data import dataset_identity
from cartlib.data.augment import hash_seed, view, views_are
from cartlib.data.stream import Bases, ItemSource, batches, source_for
from cartlib.hardware import HALF_DTYPES, PRECISIONS
from cartlib.io import atomic_write_bytes, disk_full_error, process_state, resolve_run_dir
from cartlib.sample import generate
from cartlib.shards import (
    TOKEN_DTYPE,
    ShardWriter,
    Stale,
    TokenShards,
    check_shard,
    plan_shards,
    shard_error,
    shard_folder,
    tokenizer_hash,
    write_manifest,
)
from cartlib.train.ar import trained_on
from cartlib.train.checkpoints import read_manifest, stage_state
from cartlib.train.loop import check_stage_config


# ----------------------------------------------------------------------------- finished stages
def finished(folder: Path, steps: int) -> bool:
    """Whether ``folder`` holds a checkpoint of at least ``steps`` steps (from its manifest,
    nothing unpickled: :func:`cartlib.train.checkpoints.stage_state`)."""
    return stage_state(folder, steps).finished


def _has_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds any checkpoint (finished or partial), without loading one."""
    return bool(read_manifest(folder)) or (folder / train.CKPT_NAME).exists()


def _folder(stage: str, run_dir, cfg) -> Path:
    return (train.tokenizer_dir if stage == "tokenizer" else train.ar_dir)(run_dir, cfg)


def _steps(stage: str, cfg) -> int:
    return cfg.tokenizer.steps if stage == "tokenizer" else cfg.ar.steps


def _on(folder: Path, tokenizer) -> bool:
    """Whether the transformer in ``folder`` was trained on ``tokenizer``'s tokens (None: any)."""
    return tokenizer is None or trained_on(folder) == tokenizer_hash(tokenizer)


def settle(stage: str, cfg, run_dir, shipped: bool | None = None, tokenizer=None):
    """The config whose ``stage`` folder a call uses: ``cfg`` at the precision this machine
    trains in (:meth:`RunConfig.resolved`) when the run directory holds that stage (finished or
    partial) or cartlib ships it; else, unless ``shipped`` is False (train anew), the same
    settings at another precision when a finished one is in the run directory, or (``shipped``
    True) in :mod:`cartlib.shipped`; else ``cfg`` resolved, to be trained. A transformer counts
    only on ``tokenizer`` (None: on any)."""
    cfg, run_dir = cfg.resolved(), resolve_run_dir(run_dir)

    def ships(c) -> bool:
        src = shipped_stages.find(stage, c)
        return src is not None and (
            stage == "tokenizer"
            or tokenizer is None
            or shipped_stages.tokenizer_of(src) == tokenizer_hash(tokenizer)
        )

    def done(c) -> bool:
        folder = _folder(stage, run_dir, c)
        return finished(folder, _steps(stage, c)) and (
            stage == "tokenizer" or _on(folder, tokenizer)
        )

    if _has_checkpoint(_folder(stage, run_dir, cfg)) or (shipped and ships(cfg)):
        return cfg
    if shipped is False:
        return cfg
    others = [cfg.updated(mixed_precision=p) for p in PRECISIONS if p != cfg.mixed_precision]
    for c in others:
        if done(c):
            return c
    for c in others if shipped else ():
        if ships(c):
            return c
    return cfg


def trained(stage: str, cfg, run_dir, tokenizer=None):
    """The finished tokenizer (``stage="tokenizer"``) or transformer (``"ar"``, on ``tokenizer``)
    of ``cfg`` in ``run_dir`` (at any precision, :func:`settle`); an unfinished or missing one
    is an error giving the command (whose ``--config`` file it writes when the folder has none;
    ``cfg`` read from another stage folder's hand-edited config.yaml is named as such)."""
    cfg = settle(stage, cfg, run_dir, None, tokenizer)
    folder, steps = _folder(stage, run_dir, cfg), _steps(stage, cfg)
    state = stage_state(folder, steps)  # the loader below checks the file's sha256
    if not state.finished:
        if state.status == "missing":
            _refuse_edited_copy(stage, cfg, run_dir)
        config = folder / "config.yaml"
        if not config.exists() and process_state().is_main_process:
            folder.mkdir(parents=True, exist_ok=True)  # so that the command below runs as given
            save_config(cfg, config)
        command = stage_command(cfg, f"train-{stage}", config, run_dir)
        raise FileNotFoundError(
            f"{folder} holds no finished {stage} ({state.step} of {steps} steps): train it "
            f"first:\n"
            f"  {command}"
        )
    if stage == "tokenizer":
        return train.load_tokenizer(folder)
    return train.load_ar(folder, tokenizer)


def _refuse_edited_copy(stage: str, cfg, run_dir: Path) -> None:
    """When ``cfg`` (which has no trained ``stage`` in ``run_dir``) is what another stage folder's
    ``config.yaml`` now says, that file was edited after training and given as ``--config``:
    say so (:func:`check_stage_config`) instead of sending the user to a folder that does not
    exist."""
    key = cfg.artifact_key(stage)
    for folder in sorted(run_dir.glob(f"{stage}-*")):
        config = folder / "config.yaml"
        named = STAGE_FOLDER.fullmatch(folder.name)
        if named is None or named["key"] == key or not config.is_file():
            continue
        try:
            edited = load_config(config)
        except (OSError, ValueError):
            continue
        if edited.artifact_key(stage) == key:
            check_stage_config(folder, edited)


# ---------------------------------------------------------------------------- token extraction
def extract_command(cfg, run_dir, split: str = "train") -> str:
    """The command that (re)builds the token shards of ``split`` (it resumes shard by shard)."""
    tok_dir = train.tokenizer_dir(run_dir, cfg)
    cmd = stage_command(cfg, "extract-tokens", tok_dir / "config.yaml", run_dir)
    return cmd + ("" if split == "train" else f" --split {split}")


def _meta(cfg, tokenizer, source: ItemSource, split: str) -> dict:
    sched = tokenizer.schedule
    if tokenizer.quantizer.codebook_size > np.iinfo(TOKEN_DTYPE).max + 1:
        raise ConfigError(
            f"codebook_size={tokenizer.quantizer.codebook_size} does not fit the uint16 token "
            "shards (at most 65536 codes)"
        )
    d = cfg.data
    return {
        "split": split,
        "dataset": source.key,
        "views": d.views,
        "views_are": views_are(d.random_crop, d.hflip),
        "seq_len": sched.seq_len,
        "schedule": sched.describe(),
        "codebook_size": tokenizer.quantizer.codebook_size,
        "num_classes": source.num_classes,
        "augment": {"mid_ratio": d.mid_ratio, "resolution": d.resolution},
        "tokenizer": tokenizer_hash(tokenizer),
        "shard_size": d.shard_size,
        # which images, in order, as they are (names, sizes, times / pixels): shards of data
        # that changed since are refused by extraction and by training (rank 0's, for all)
        "identity": _broadcast(getattr(source.dataset, "identity", lambda: source.key)()),
    }


def _broadcast(value):
    """``value`` of the main process on every process (a launched group), else itself."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def current_identity(cfg, split: str) -> str | None:
    """The identity of the data of ``split`` as it is now (rank 0's, on every process), or None
    when the images are not on this machine (:func:`cartlib.data.dataset_identity`)."""
    main = process_state().is_main_process
    return _broadcast(dataset_identity(cfg.data, split) if main else None)


@torch.no_grad()
def extract_shards(
    cfg, run_dir, tokenizer, split: str = "train", source=None, progress: bool = True,
    redo_bad: bool = False,
) -> TokenShards:  # fmt: skip
    """Encode ``split`` into token shards next to the tokenizer (this process's share of the
    unfinished shards; all of them without a launcher) and return them, checked, memory-mapped.
    ``source``: the split's ItemSource when the caller already opened it. ``redo_bad``:
    re-encode the shards that fail their checks (else they are an error saying so); shards of
    data that changed since (:class:`~cartlib.shards.Stale`) are always an error."""
    state, d = process_state(), cfg.data
    if d.views < 1:
        raise ConfigError(f"data.views={d.views} must be >= 1 (1: the centre crop)")
    if d.cache_bases and d.views > 1 and cfg.order:
        raise ConfigError(
            f"data.views={d.views} encodes mirrored or cropped views, whose bases the on-disk "
            "cache (data.cache_bases=True, centre crops only) does not hold: set "
            "data.cache_bases=False (decomposed per batch on the device) or data.views=1"
        )
    source = source or source_for(d, split, progress)
    folder = shard_folder(train.tokenizer_dir(run_dir, cfg), split)
    rebuild = extract_command(cfg, run_dir, split)
    device = state.device
    tokenizer = tokenizer.to(device).eval()
    meta = _meta(cfg, tokenizer, source, split)
    shards = plan_shards(len(source), d.shard_size)
    todo = []
    for shard in shards[state.process_index :: state.num_processes]:
        reason = check_shard(folder, shard, meta)
        if reason == "missing" or (
            reason is not None and redo_bad and not isinstance(reason, Stale)
        ):
            todo.append(shard)
        elif reason is not None:
            raise shard_error(folder, shard, reason, rebuild)
    if todo:
        folder.mkdir(parents=True, exist_ok=True)
        _encode(cfg, tokenizer, source, folder, todo, meta, device, progress)
    state.wait_for_everyone()
    if state.is_main_process:
        for shard in shards:
            reason = check_shard(folder, shard, meta)
            if reason is not None:
                raise shard_error(folder, shard, reason, rebuild)
        write_manifest(folder, shards, meta)
    state.wait_for_everyone()
    return TokenShards(folder, meta["tokenizer"], rebuild, meta["identity"])


def _encode(cfg, tokenizer, source, folder, todo, meta, device, progress) -> None:
    """Encode the shards ``todo`` in fixed batches of ``tokenizer.batch_size`` images: the global
    batch of tokenizer training, encoded without gradients (so it fits where a training step's
    share fits), and the same batches whatever the number of processes."""
    views, seed = meta["views"], cfg.tokenizer.seed
    bs = cfg.tokenizer.batch_size
    bases_of = Bases(cfg, source, device, progress)
    plan = []  # (shard, first row, requests) per batch, in reading order
    for shard in todo:
        span = range(shard.start, shard.start + shard.count)
        rows = [view(i, v, seed, cfg.data.random_crop, cfg.data.hflip)
                for i in span for v in range(views)]  # fmt: skip
        plan += [(shard, r, rows[r : r + bs]) for r in range(0, len(rows), bs)]
    reads = batches(source, [reqs for _, _, reqs in plan], cfg.data.workers, device.type == "cuda")
    bar = tqdm(total=sum(s.count for s in todo), desc="extract tokens", unit="img",
               disable=not progress)  # fmt: skip
    writer, labels = None, None
    for (shard, row, _), (x, y, idx) in zip(plan, reads, strict=True):
        if writer is None or writer.shard != shard:
            writer, labels = ShardWriter(folder, shard, meta), np.zeros(shard.count, np.int32)
        x = x.to(device, non_blocking=True).float().div_(255)  # (b, 3, R, R)
        maps = tokenizer.encode(x, bases_of(x, idx))  # M maps (b, h_k, w_k)
        flat = torch.cat([m.flatten(1) for m in maps], 1)  # (b, L)
        writer.write(row, flat.cpu().numpy().astype(TOKEN_DTYPE))
        labels[idx.numpy() - shard.start] = y.numpy()
        if row + len(idx) == shard.count * views:
            writer.finish(labels)
        bar.update(len(idx) / views)
    bar.close()


# ------------------------------------------------------------------------------------ sampling
def sample_folder(cfg, run_dir, settings: dict) -> Path:
    """``<ar dir>/samples-<hash of the sampling settings>``."""
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return train.ar_dir(run_dir, settle("ar", cfg, run_dir)) / f"samples-{key}"


def _write_png(path: Path, image: np.ndarray) -> None:
    """``image`` as a PNG at ``path``, whole or not at all (a temp file renamed into place; a
    killed job's is overwritten next time, a full disk's removed and reported by folder)."""
    buf = BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise (disk_full_error(e, path, len(buf.getvalue())) or e) from e


def sampling_precision(cfg, device: torch.device) -> str | None:
    """The 16-bit precision the transformer samples in on ``device`` (autocast), or None for
    fp32: on GPUs the run's bf16/fp16 (a 2B-parameter model samples ~3x slower in fp32); on
    CPUs fp32 whatever they train in, so that samples of the shipped models are the same on
    every CPU."""
    return cfg.precision if device.type == "cuda" and cfg.precision in HALF_DTYPES else None


@torch.no_grad()
def sample_images(
    cfg,
    run_dir,
    per_class: int | None = None,
    batch: int = 50,
    seed: int = 0,
    progress=True,
    models: tuple | None = None,
) -> Path:
    """``per_class`` (default ``cfg.sample.per_class``) samples of every class of the trained
    transformer of ``cfg``, drawn with the settings of ``cfg.sample`` (guidance, top-k/p,
    rejection: the full-scale presets hold VAR's FID setting): image j has label j mod C and
    belongs to chunk j // batch, generated with the seed (seed, chunk). Writes ``png/<j>.png``,
    ``samples.npz`` and ``manifest.json`` into :func:`sample_folder` (returned). ``models``:
    the (tokenizer, transformer) of ``cfg`` when the caller holds them already, else they are
    loaded from ``run_dir``."""
    per_class = cfg.sample.per_class if per_class is None else per_class
    for name, value in (("per_class", per_class), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"{name}={value!r}: give a whole number >= 1 (--{name.replace('_', '-')}); "
                "nothing was written"
            )
    state = process_state()
    if models is None:
        tok = trained("tokenizer", cfg, run_dir)
        models = tok, trained("ar", cfg, run_dir, tok)
    tok, model = (m.to(state.device) for m in models)
    kw = cfg.sample.generate_kwargs()
    settings = {"per_class": per_class, "batch": batch, "seed": seed, **kw}
    half = sampling_precision(cfg, state.device)
    half_dtype = HALF_DTYPES.get(half)
    if half is not None:
        settings["autocast"] = half  # other samples: another folder
    folder = sample_folder(cfg, run_dir, settings)
    png = folder / "png"
    png.mkdir(parents=True, exist_ok=True)
    n, nc = per_class * model.num_classes, model.num_classes
    chunks = range(0, n, batch)
    mine = [c for k, c in enumerate(chunks) if k % state.num_processes == state.process_index]
    paths = lambda c: [png / f"{j:06d}.png" for j in range(c, min(n, c + batch))]
    todo = [c for c in mine if not all(p.exists() for p in paths(c))]
    for c in tqdm(todo, desc="sampling", unit="batch", disable=not progress):
        labels = torch.arange(c, min(n, c + batch)) % nc
        with torch.autocast(state.device.type, dtype=half_dtype, enabled=half is not None):
            gen = generate(model, tok, labels, seed=hash_seed(seed, c // batch), **kw)
        images = (
            (gen.images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        )
        for path, image in zip(paths(c), images, strict=True):
            _write_png(path, image)
    state.wait_for_everyone()
    if state.is_main_process:
        pack_npz([png / f"{j:06d}.png" for j in range(n)], folder / "samples.npz")
        manifest = {**settings, "count": n, "num_classes": nc, "labels": "j mod num_classes"}
        atomic_write_bytes(folder / "manifest.json", json.dumps(manifest, indent=1).encode())
    state.wait_for_everyone()
    return folder


def pack_npz(files: list[Path], path: Path) -> None:
    """The ADM evaluator's batch ``arr_0`` uint8 (N, H, W, 3) from PNG files, written one image
    at a time into the (uncompressed) zip (atomically: temp file, then rename)."""
    first = np.asarray(Image.open(files[0]).convert("RGB"))
    header = {"descr": "|u1", "fortran_order": False, "shape": (len(files), *first.shape)}
    tmp = path.with_name(f".{path.name}.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        entry = zipfile.ZipInfo("arr_0.npy", date_time=(1980, 1, 1, 0, 0, 0))  # reproducible
        with zf.open(entry, "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            for file in files:
                with Image.open(file) as im:
                    arr = np.asarray(im.convert("RGB"))
                if arr.shape != first.shape:
                    raise ValueError(f"{file} is {arr.shape}, the first sample {first.shape}")
                f.write(np.ascontiguousarray(arr).tobytes())
    os.replace(tmp, path)


def sample_stage(
    cfg, run_dir: str | Path, per_class: int | None = None, seed: int = 0,
    batch: int = 50,
) -> Path:  # fmt: skip
    """The sample set of the paper's FID protocol (``per_class`` images of every class, default
    ``cfg.sample.per_class``; PNGs and the ADM evaluator's ``samples.npz``), drawn with
    ``cfg.sample``'s settings: for a full-scale run on a machine with several GPUs (or, under
    :data:`cartlib.launch.FULL_SCALE_ON_CPU`, CPU processes) by ``accelerate launch -m cartlib
    sample`` over them, each process its share of the chunks; else here. -> the sample folder
    (the same files either way: chunks are seeded by their index)."""
    run_dir = resolve_run_dir(run_dir)
    gpus = torch.cuda.device_count()
    procs = min(gpus, cfg.num_processes) if gpus else cfg.num_processes * launch.cpu_full_scale()
    if launch.full_scale(cfg) and procs > 1:
        config_path = run_dir / "sample-config.yaml"
        save_config(cfg, config_path)
        args = launch_args(Cluster(procs), "sample", config_path, run_dir, cfg.mixed_precision)
        args += ["--batch", str(batch), "--seed", str(seed)]
        args += ["--per-class", str(per_class)] if per_class is not None else []
        code = launch.stream(args)
        if code != 0:
            raise RuntimeError(f"sampling exited with code {code}; see its output above")
    return sample_images(cfg, run_dir, per_class, batch, seed, progress=False)  # (finished: read)
