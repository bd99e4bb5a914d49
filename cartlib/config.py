"""Configuration: dataclass sections, named presets, and the notebook-parameter validator.

A run is described by one :class:`RunConfig` made of sections (``data``, ``decompose``,
``tokenizer``, ``ar``). The dataclass defaults are the *smoke* scale; a preset
(``cartlib/presets/<name>.yaml``) is a small file that overrides some of them, optionally on top of
another preset (``base: tiny``). Every override is type-checked against the default it replaces,
and unknown names are refused with the closest valid name, so a typo never silently becomes a
smoke run.

Notebooks take their parameters as plain assignments in the cell tagged ``parameters``. The next
cell calls :func:`notebook_params`, which collects those names from the kernel namespace and checks
them against the notebook's schema (papermill itself only warns about unknown names).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A configuration value or name is invalid; the message says which and what to do."""


# ----------------------------------------------------------------------------------------- sections
@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"  # fashion-mnist | skimage-photos | cifar10 | imagefolder
    resolution: int = 32  # images are resized to resolution x resolution
    root: str | None = None  # local folder (imagefolder, or idx/cifar files); None = defaults
    train_limit: int | None = 2048  # use the first N training images (None = all)
    test_limit: int | None = 512  # held-out images for evaluation (None = all)
    bad_files: str = "error"  # error | skip  (imagefolder: corrupt or unreadable files)


@dataclass
class DecomposeConfig:
    order: int = 3  # n in I = B_n + D_n + ... + D_1 (Eq. 6); 0 = no decomposition (VAR)
    alpha: float = 1.0  # smoothness weight (Eq. 4), paper: 1
    lam: float = 0.01  # edge-length weight (Eq. 4), paper: 0.01
    eps: float | None = None  # AT edge width; None = the solver's documented default


@dataclass
class TokenizerConfig:
    quantizer: str = "base_detail"  # vanilla | multiscale | base_detail
    channels: int = 32  # first conv width of encoder/decoder
    ch_mult: tuple[int, ...] = (1, 2, 2)  # len(ch_mult) - 1 downsamplings of 2x
    latent_channels: int = 16
    codebook_size: int = 256  # V (paper: 4096)
    base_patch_nums: tuple[int, ...] = (1, 2, 4, 8)  # base steps, last = latent size
    depth_per_factor: int = 1  # detail steps per factor, (M - B) / n
    detail_carry: bool = False  # True: detail steps also correct earlier error (not Alg. 1)
    rq_depth: int = 1  # vanilla only: residual steps at full size (1 = plain VQ-VAE)
    phi_share: int = 0  # 0 = one phi_k per step (paper); k > 0 = k shared convs (VAR: 4)
    phi_kernel: int = 3
    beta: float = 0.25  # commitment weight
    w_rec: float = 1.0
    w_lpips: float = 0.0  # lambda_p in Eq. 2
    w_gan: float = 0.0  # lambda_G in Eq. 2
    gan_start: int = 0  # discriminator switched on after this many steps
    w_base: float = 0.5  # supervise base-only reconstruction against B_n (see tokenizer docs)
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-4
    dead_code_every: int = 50  # restart unused codes every N steps (0 = never)
    ckpt_every: int = 100
    seed: int = 0


@dataclass
class ARConfig:
    depth: int = 2  # transformer blocks; width = 64 * depth, heads = depth (VAR)
    width: int | None = None  # None = 64 * depth
    heads: int | None = None  # None = depth
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    cond_drop: float = 0.1  # label dropout for classifier-free guidance
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3  # per 256 images (VAR's "tblr"): the optimizer gets lr * batch_size / 256
    weight_decay: float = 0.05
    warmup: int = 30
    grad_clip: float = 2.0
    ckpt_every: int = 100
    seed: int = 0


@dataclass
class RunConfig:
    name: str = "smoke"
    data: DataConfig = field(default_factory=DataConfig)
    decompose: DecomposeConfig = field(default_factory=DecomposeConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    ar: ARConfig = field(default_factory=ARConfig)
    mixed_precision: str = "no"  # no | bf16 | fp16  (bf16 pays on CPUs with avx512_bf16 too)
    num_processes: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = ("data", "decompose", "tokenizer", "ar")


# ----------------------------------------------------------------------------------- type checking
def _check_value(where: str, value: Any, tp: Any) -> Any:
    """Return ``value`` converted to the annotated type ``tp`` or raise a ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_value(where, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}={value!r} is not allowed")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r} must be a list, e.g. [1, 2, 4, 8]")
        inner = args[0] if args else Any
        items = [_check_value(f"{where}[{i}]", v, inner) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}={value!r} must be a number (got {type(value).__name__})")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}={value!r} must be an integer (got {type(value).__name__})")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} must be True or False")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}={value!r} must be a string (got {type(value).__name__})")
        return value
    raise ConfigError(f"{where}: unsupported type {tp!r}")


def _unknown(kind: str, name: str, valid: typing.Iterable[str]) -> ConfigError:
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ConfigError(f"unknown {kind} {name!r}: {hint}valid names are {', '.join(valid)}")


def apply_overrides(obj: Any, overrides: dict[str, Any], where: str = "") -> Any:
    """Return a copy of dataclass ``obj`` with ``overrides`` applied (nested dicts for sections)."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for key, value in overrides.items():
        if key not in names:
            raise _unknown(f"setting in {where or type(obj).__name__}", key, names)
        sub = getattr(obj, key)
        if dataclasses.is_dataclass(sub):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key} must be a mapping of its settings, got {value!r}")
            changes[key] = apply_overrides(sub, value, f"{where}{key}.")
        else:
            changes[key] = _check_value(f"{where}{key}", value, hints[key])
    return dataclasses.replace(obj, **changes)


# ------------------------------------------------------------------------------------------ presets
def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def _preset_dict(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        raise _unknown("preset", name, available_presets())
    if name in seen:
        raise ConfigError(f"preset {name!r} inherits from itself through {' -> '.join(seen)}")
    raw = yaml.safe_load(path.read_text()) or {}
    base = raw.pop("base", None)
    merged = _preset_dict(base, (*seen, name)) if base else {}
    for key, value in raw.items():
        if isinstance(value, dict):
            merged[key] = {**merged.get(key, {}), **value}
        else:
            merged[key] = value
    return merged


def load_preset(name: str, **overrides: Any) -> RunConfig:
    """The :class:`RunConfig` of preset ``name`` (smoke, tiny, cart-d16-256, ...), then overrides.

    ``overrides`` use the same nested shape as the preset files, e.g.
    ``load_preset("tiny", ar={"depth": 4})``.
    """
    merged = _preset_dict(name)
    merged["name"] = name
    cfg = apply_overrides(RunConfig(), merged)
    return apply_overrides(cfg, overrides) if overrides else cfg


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False))


def load_config(path: str | Path) -> RunConfig:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    return apply_overrides(RunConfig(), raw)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- notebook parameters
_IPYTHON_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}


def _namespace_params(namespace: dict[str, Any]) -> dict[str, Any]:
    """The plain values a parameters cell (and papermill's injected cell) put in the namespace."""
    out = {}
    for name, value in namespace.items():
        if name.startswith("_") or name in _IPYTHON_NAMES:
            continue
        if isinstance(value, (types.ModuleType, types.FunctionType, type)) or callable(value):
            continue
        out[name] = value
    return out


def validate_params(schema: type, namespace: dict[str, Any]) -> Any:
    """Check a notebook's parameters against ``schema`` (a dataclass) and return an instance.

    Unknown names (a typo, or a parameter of another notebook) and wrong types raise a
    :class:`ConfigError` naming the value and the fix; papermill alone would only warn.
    """
    given = _namespace_params(namespace)
    hints = typing.get_type_hints(schema)
    names = {f.name for f in dataclasses.fields(schema)}
    values = {}
    for key, value in given.items():
        if key not in names:
            raise _unknown(f"parameter of this notebook ({schema.__name__})", key, names)
        values[key] = _check_value(key, value, hints[key])
    return schema(**values)


def run_config_from_params(params: Any, mapping: dict[str, str]) -> RunConfig:
    """Preset ``params.preset`` with every non-None notebook parameter named in ``mapping``
    (parameter name -> ``section.field``) applied on top."""
    overrides: dict[str, Any] = {}
    for pname, target in mapping.items():
        value = getattr(params, pname)
        if value is None:
            continue
        node = overrides
        *path, last = target.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return load_preset(params.preset, **overrides)


# ---------------------------------------------------------------- notebook parameter schemas
# One dataclass per notebook: field names and defaults equal the notebook's `parameters` cell
# (tests/test_notebooks.py checks it). ``None`` means "the preset's value". NOTEBOOKS maps each
# override to the RunConfig setting it replaces.
@dataclass
class DecompositionParams:  # 01_mumford_shah_decomposition
    preset: str = "smoke"
    dataset: str | None = None
    resolution: int | None = None
    order: int | None = None
    alpha: float | None = None
    lam: float | None = None
    eps: float | None = None
    n_images: int = 4
    run_dir: str = "papermill_runs/smoke"
    seed: int = 0
    progress: bool = True


@dataclass
class TokenizerParams:  # 02_train_tokenizer
    preset: str = "smoke"
    quantizer: str | None = None
    order: int | None = None
    codebook_size: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    beta: float | None = None
    w_lpips: float | None = None
    w_gan: float | None = None
    gan_start: int | None = None
    w_base: float | None = None
    mixed_precision: str | None = None
    dataset: str | None = None
    resolution: int | None = None
    compare_base_loss: bool = True
    n_show: int = 8
    run_dir: str = "papermill_runs/smoke"
    progress: bool = True


@dataclass
class TokenizationParams:  # 03_tokenization
    preset: str = "smoke"
    order: int | None = None
    steps: int | None = None
    n_eval: int = 256
    n_show: int = 4
    run_dir: str = "papermill_runs/smoke"
    progress: bool = True


@dataclass
class TrainARParams:  # 04_train_ar
    preset: str = "smoke"
    depth: int | None = None
    dataset: str | None = None
    resolution: int | None = None
    order: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    num_processes: int | None = None
    mixed_precision: str | None = None
    data_root: str | None = None
    run_dir: str = "papermill_runs/smoke"
    progress: bool = True


@dataclass
class SamplingParams:  # 05_sampling
    preset: str = "smoke"
    guidance: float = 2.0
    cfg_schedule: str = "linear"
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    n_per_class: int = 4
    seed: int = 42
    sweep: bool = True
    run_dir: str = "papermill_runs/smoke"
    progress: bool = True


@dataclass
class AblationParams:  # 06_ablation_decomposition_order
    preset: str = "smoke"
    orders: list[int] = field(default_factory=lambda: [0, 3])
    flat_base: bool = False
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    n_samples: int = 50
    n_reference: int = 200
    guidance: float = 2.0
    tokenizer_steps: int | None = None
    ar_steps: int | None = None
    run_dir: str = "papermill_runs/smoke"
    progress: bool = True


@dataclass
class AttentionParams:  # 07_attention_maps
    preset: str = "smoke"
    layer: int = -1
    label: int = 0
    seed: int = 42
    run_dir: str = "papermill_runs/smoke"
    progress: bool = True


_DATA_MAP = {"dataset": "data.dataset", "resolution": "data.resolution"}
_TOK_MAP = {
    k: f"tokenizer.{k}"
    for k in (
        "quantizer",
        "codebook_size",
        "steps",
        "batch_size",
        "lr",
        "beta",
        "w_lpips",
        "w_gan",
        "gan_start",
        "w_base",
    )
}
_AR_MAP = {k: f"ar.{k}" for k in ("depth", "steps", "batch_size", "lr")}
_RUN_MAP = {"mixed_precision": "mixed_precision", "num_processes": "num_processes"}
_DECOMP_MAP = {k: f"decompose.{k}" for k in ("order", "alpha", "lam", "eps")}

NOTEBOOKS: dict[str, tuple[type, dict[str, str]]] = {
    "01_mumford_shah_decomposition": (DecompositionParams, {**_DATA_MAP, **_DECOMP_MAP}),
    "02_train_tokenizer": (
        TokenizerParams,
        {**_DATA_MAP, **_TOK_MAP, "order": "decompose.order", "mixed_precision": "mixed_precision"},
    ),
    "03_tokenization": (
        TokenizationParams,
        {"order": "decompose.order", "steps": "tokenizer.steps"},
    ),
    "04_train_ar": (
        TrainARParams,
        {**_DATA_MAP, **_AR_MAP, "order": "decompose.order", "data_root": "data.root", **_RUN_MAP},
    ),
    "05_sampling": (SamplingParams, {}),
    "06_ablation_decomposition_order": (
        AblationParams,
        {"tokenizer_steps": "tokenizer.steps", "ar_steps": "ar.steps"},
    ),
    "07_attention_maps": (AttentionParams, {}),
}


def notebook_config(notebook: str, namespace: dict[str, Any]) -> tuple[Any, RunConfig]:
    """Validate the parameters a notebook's kernel holds and build its RunConfig.

    Call it in the cell right after the ``parameters`` cell::

        params, cfg = config.notebook_config("01_mumford_shah_decomposition", globals())
    """
    if notebook not in NOTEBOOKS:
        raise _unknown("notebook", notebook, NOTEBOOKS)
    schema, mapping = NOTEBOOKS[notebook]
    params = validate_params(schema, namespace)
    return params, run_config_from_params(params, mapping)
