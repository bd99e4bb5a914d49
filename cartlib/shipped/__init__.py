"""Trained checkpoints that ship inside cartlib, so that notebooks 03 and 05-09 open in seconds.

``tiny/``: Figure 11's tokenizers and CART's and VAR's transformers (Fashion-MNIST and
``photos``), trained by ``make run``; ``smoke/``: notebook 09's intrinsic and specular CARTs at its
defaults (``photos``), trained by 09 itself and exported with ``python -m cartlib ship --preset
smoke --dataset photos --for 09``.

``cartlib/shipped/<preset>/<stage folder>/`` holds a stage that ``make run`` trained at that
preset, under the name its run-directory folder has (``tokenizer-…-<key>``, ``ar-…-<key>``):

* ``config.yaml`` — the run's config. A shipped stage is used only for a config with the same
  :meth:`RunConfig.artifact_key` (every setting the weights depend on), never otherwise — but
  for the precision: where a config at this machine's precision has none, the same settings at
  another precision are looked up (:func:`cartlib.stages.settle`), so the bf16-trained
  checkpoints open on machines that train in fp32;
* ``weights.pt`` — the module's state dict with float tensors in float16 (half the bytes);
  installed, they are float32 again. Every metric below is that of these rounded weights;
* ``num_classes.txt`` (transformers), ``history.json.gz`` (the training curves);
* ``metrics.json`` — where it came from (run dir, step, date, sha256 of ``weights.pt``) and its
  held-out metrics, measured at export with the code of that commit: the tokenizer's
  reconstruction MSE on the first :data:`N_HELDOUT` test images; the transformer's
  teacher-forced cross-entropy of their tokens and the FID of :data:`N_FID` class-balanced
  samples (seed 0, the config's sampling settings) against the first :data:`N_REFERENCE` test
  images. ``tests/test_shipped.py`` recomputes them with the current code and fails when one
  moves by more than :data:`TOLERANCE`: a change that silently breaks a trained model (its
  loading, encoding, sampling) fails ``make test``.

How a notebook uses them (:func:`cartlib.runs.ensure_tokenizer` / ``ensure_ar`` with
``shipped=True``, i.e. ``-p retrain False``): when the run directory has no checkpoint of that
stage, the shipped one is *installed* there — a stage folder like a trained one plus a marker
``shipped.json`` — and loaded. A transformer is installed only on top of the tokenizer it was
trained with. ``shipped=False`` (``-p retrain True``; ``make run`` passes it) empties an
installed folder and trains; training into a folder never resumes an installed checkpoint.

Making them (after ``make run``, which trains everything from scratch)::

    python -m cartlib ship --preset tiny --run-dir papermill_runs/tiny
"""

from __future__ import annotations

import datetime
import gzip
import json
import math
import shutil
import tempfile
from pathlib import Path

import torch

from cartlib import metrics, train
from cartlib.config import load_config
from cartlib.io import atomic_torch_save, atomic_write_bytes, project_root, sha256_file
from cartlib.sample import generate
from cartlib.shards import tokenizer_hash
from cartlib.tokenizer.tokenizer import reconstruction_report
from cartlib.train.ar import TOKENIZER_HASH, heldout_ce
from cartlib.train.checkpoints import INSTALLED, installed_from, load_latest, save_checkpoint

ROOT = Path(__file__).parent
WEIGHTS, METRICS, HISTORY = "weights.pt", "metrics.json", "history.json.gz"
N_HELDOUT = 256  # test images for the tokenizer's MSE and the transformer's cross-entropy
N_FID, N_REFERENCE, FID_SEED = 100, 200, 0  # FID of 100 samples vs 200 test images (as nb 06)
# the largest relative change of a recorded metric that tests/test_shipped.py accepts: the
# same code on this CPU reproduces them exactly; another machine's kernels shift the decoded
# pixels (MSE), the logits (CE) and, through a flipped sampled token, a few samples (FID)
TOLERANCE = {"mse": 0.02, "ce": 0.01, "fid": 0.05}
STAGES = {"tokenizer": ("tokenizer", train.tokenizer_dir), "ar": ("model", train.ar_dir)}


def folder_name(stage: str, cfg) -> str:
    """The name of ``cfg``'s ``stage`` folder in a run directory (and here)."""
    return STAGES[stage][1](Path("."), cfg).name


class DamagedShippedFile(ValueError):
    """A file of a shipped stage cannot be read (damaged, truncated or a Git LFS pointer)."""


def _read(path: Path, parse):
    """``parse(path)``, or an error naming the shipped file and how to restore it."""
    try:
        return parse(path)
    except Exception as e:  # any parse failure: yaml, json, gzip, a missing file
        raise DamagedShippedFile(
            f"the shipped file {path} cannot be read ({type(e).__name__}: {e}): restore it with "
            f"`git checkout -- {path.parent}`, or train instead (-p retrain True)"
        ) from e


def find(stage: str, cfg) -> Path | None:
    """The shipped folder of ``cfg``'s ``stage``, or None. The folder name carries 8 hex digits
    of the artifact key; the shipped config must give the whole key too."""
    for path in sorted(ROOT.glob(f"*/{folder_name(stage, cfg)}")):
        shipped_cfg = _read(path / "config.yaml", load_config)
        if shipped_cfg.artifact_key(stage) == cfg.artifact_key(stage):
            return path
    return None


def tokenizer_of(src: Path) -> str:
    """The hash of the tokenizer the shipped transformer in ``src`` was trained on."""
    return json.loads((src / METRICS).read_text())["tokenizer_hash"]


def available() -> list[Path]:
    """Every shipped stage folder."""
    return sorted(p.parent for p in ROOT.glob(f"*/*/{METRICS}"))


def _cast(state: dict, dtype: torch.dtype) -> dict:
    """``state`` with its floating tensors in ``dtype`` (float16 on disk, float32 installed)."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def install(stage: str, cfg, run_dir, tokenizer=None) -> Path | None:
    """Install the shipped ``stage`` of ``cfg`` into ``run_dir`` (None when none is shipped).
    For a transformer, ``tokenizer`` (loaded from ``run_dir``) must be the one it was trained
    with, else nothing is installed (it is trained on that tokenizer instead)."""
    src = find(stage, cfg)
    if src is None:
        return None
    info = _read(src / METRICS, lambda p: json.loads(p.read_text()))
    if stage == "ar" and (tokenizer is None or tokenizer_hash(tokenizer) != info["tokenizer_hash"]):
        return None
    weights = src / WEIGHTS
    if sha256_file(weights) != info["sha256"]:
        raise ValueError(
            f"{weights} does not match the sha256 in {src / METRICS} (damaged, or a Git LFS "
            f"pointer): restore it with `git checkout -- {src}`, or train instead (-p retrain True)"
        )
    module = STAGES[stage][0]
    dest = STAGES[stage][1](run_dir, cfg)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "config.yaml", dest / "config.yaml")
    if (src / "num_classes.txt").exists():
        shutil.copyfile(src / "num_classes.txt", dest / "num_classes.txt")
    history_json = _read(src / HISTORY, lambda p: gzip.decompress(p.read_bytes()))
    _read(src / HISTORY, lambda p: json.loads(gzip.decompress(p.read_bytes())))
    atomic_write_bytes(dest / "history.json", history_json)
    if stage == "ar":
        (dest / TOKENIZER_HASH).write_text(info["tokenizer_hash"])
    state = _cast(torch.load(weights, map_location="cpu", weights_only=True), torch.float32)
    history = json.loads(history_json)
    save_checkpoint(dest, {"step": info["step"], "modules": {module: state}, "history": history})
    marker = {"source": str(src.relative_to(ROOT.parent.parent)), "sha256": info["sha256"]}
    atomic_write_bytes(dest / INSTALLED, json.dumps(marker, indent=1).encode())
    print(f"installed the shipped {stage} {src.name} (step {info['step']}) into {dest}")
    return dest


# ------------------------------------------------------------------------------ measuring
def heldout(cfg, n: int = N_HELDOUT):
    """(images, bases or None, labels) of the first ``n`` test images of ``cfg``'s data."""
    images, bases, labels = train.tokenizer_training_data(cfg, "test", progress=False)
    return images[:n], None if bases is None else bases[:n], labels[:n]


@torch.no_grad()
def measure(cfg, tokenizer, model=None, mse: bool = True, fid: bool = True) -> dict:
    """The held-out metrics this module records: ``mse`` (tokenizer; unless ``mse=False``),
    ``ce`` and ``fid`` (transformer, when given; ``fid=False``: not the FID, a minute of
    Inception features on a 2-core CPU)."""
    images, bases, labels = heldout(cfg)
    out = {}
    if mse:
        report = reconstruction_report(tokenizer, images, bases if tokenizer.order else None)
        out["mse"] = report["mse"]
    if model is not None:
        out["ce"] = heldout_ce(model, tokenizer, images, bases, labels)["ce"]
    if model is not None and fid:
        per_class = math.ceil(N_FID / model.num_classes)
        y = torch.arange(per_class * model.num_classes)[:N_FID] % model.num_classes
        gen = generate(model, tokenizer, y, seed=FID_SEED, **cfg.sample.generate_kwargs())
        ref = metrics.Reference(cfg.data.dataset, "test", cfg.data.resolution, N_REFERENCE)
        out["fid"] = metrics.compute_fid_kid(gen.images, ref, kid=False)["fid"]
    return out


def installed(cfg, run_dir, with_model: bool = True):
    """(tokenizer, transformer or None) of ``cfg``, installed into ``run_dir`` from here and
    loaded as a run directory's stages are loaded."""
    tok_dir = install("tokenizer", cfg, run_dir)
    if tok_dir is None:
        raise FileNotFoundError(f"cartlib ships no {folder_name('tokenizer', cfg)}")
    tok = train.load_tokenizer(tok_dir)
    if not with_model:
        return tok, None
    ar_dir = install("ar", cfg, run_dir, tok)
    if ar_dir is None:
        raise FileNotFoundError(f"cartlib ships no {folder_name('ar', cfg)} on that tokenizer")
    return tok, train.load_ar(ar_dir, tok)


def measure_shipped(
    tokenizer_folder: Path, ar_folder: Path | None = None, fid: bool = True
) -> tuple[dict, dict]:
    """(recorded metrics, metrics now) of a shipped tokenizer (and transformer trained on it):
    both installed into a temporary run directory and loaded as a notebook loads them
    (``fid=False``: the FID neither measured nor returned as recorded)."""
    cfg = load_config((ar_folder or tokenizer_folder) / "config.yaml")
    recorded = json.loads((tokenizer_folder / METRICS).read_text())["metrics"]
    if ar_folder is not None:
        recorded = {**recorded, **json.loads((ar_folder / METRICS).read_text())["metrics"]}
    if not fid:
        recorded.pop("fid", None)
    with tempfile.TemporaryDirectory() as tmp:
        return recorded, measure(cfg, *installed(cfg, tmp, ar_folder is not None), fid=fid)


def problems(recorded: dict, now: dict) -> list[str]:
    """The metrics that moved by more than :data:`TOLERANCE` (relative)."""
    out = []
    for name, was in recorded.items():
        change = abs(now[name] - was) / abs(was)
        if not change <= TOLERANCE[name]:
            out.append(f"{name}: recorded {was:.6g}, now {now[name]:.6g} ({change:+.1%})")
    return out


# ------------------------------------------------------------------------------ exporting
def export(stage: str, cfg, run_dir, preset: str, tokenizer=None) -> Path:
    """Copy the finished ``stage`` of ``cfg`` from ``run_dir`` into ``cartlib/shipped/<preset>/``
    (weights in float16) and record its metrics (:func:`measure`, on the rounded weights)."""
    module, folder_of = STAGES[stage]
    src = folder_of(run_dir, cfg)
    found, steps = load_latest(src), (cfg.tokenizer if stage == "tokenizer" else cfg.ar).steps
    if found is None or found[0]["step"] < steps:
        raise FileNotFoundError(f"{src} holds no finished {stage}: run `make run` first")
    if installed_from(src) is not None:
        raise ValueError(f"{src} was itself installed from cartlib.shipped: export a trained one")
    state = found[0]
    dest = ROOT / preset / src.name
    dest.mkdir(parents=True, exist_ok=True)
    half = _cast(state["modules"][module], torch.float16)
    if not all(torch.isfinite(v).all() for v in half.values() if v.is_floating_point()):
        raise ValueError(f"{src}: a weight overflows float16; ship float32 weights instead")
    atomic_torch_save(half, dest / WEIGHTS)
    shutil.copyfile(src / "config.yaml", dest / "config.yaml")
    if stage == "ar":
        shutil.copyfile(src / "num_classes.txt", dest / "num_classes.txt")
    history = json.dumps(state["history"]).encode()
    atomic_write_bytes(dest / HISTORY, gzip.compress(history, mtime=0))
    info = {
        "source": str(
            src.relative_to(project_root()) if src.is_relative_to(project_root()) else src
        ),
        "step": state["step"],
        "exported": datetime.date.today().isoformat(),
        "sha256": sha256_file(dest / WEIGHTS),
        "n_heldout": N_HELDOUT,
        "n_fid": N_FID,
        "n_reference": N_REFERENCE,
        "fid_seed": FID_SEED,
        "tolerance": TOLERANCE,
    }
    if stage == "ar":
        info["tokenizer_hash"] = tokenizer_hash(tokenizer)
    atomic_write_bytes(dest / METRICS, json.dumps(info, indent=1).encode())
    return dest


def ship(cfgs: dict, run_dir, preset: str) -> list[Path]:
    """Export every tokenizer of ``cfgs`` (name -> RunConfig) and, for the configs whose name
    starts with ``ar:``, its transformer too; then record the metrics of the shipped weights
    (a folder of ``cartlib/shipped/<preset>/`` with the same name is replaced)."""
    written: list[Path] = []
    for name, cfg in cfgs.items():
        tok_dest = ROOT / preset / folder_name("tokenizer", cfg)
        new = tok_dest not in written  # a tokenizer shared by two configs is exported once
        if new:
            export("tokenizer", cfg, run_dir, preset)
        with tempfile.TemporaryDirectory() as tmp:
            tok, _ = installed(cfg, tmp, with_model=False)
            if new:
                _record(tok_dest, measure(cfg, tok))
                written.append(tok_dest)
            if name.startswith("ar:"):
                ar_dest = export("ar", cfg, run_dir, preset, tokenizer=tok)
                model = train.load_ar(install("ar", cfg, tmp, tok), tok)
                _record(ar_dest, measure(cfg, tok, model, mse=False))
                written.append(ar_dest)
    return written


def _record(dest: Path, values: dict) -> None:
    info = json.loads((dest / METRICS).read_text())
    info["metrics"] = values
    atomic_write_bytes(dest / METRICS, json.dumps(info, indent=1).encode())
    print(f"{dest.name}: " + ", ".join(f"{k} {v:.6g}" for k, v in values.items()))
