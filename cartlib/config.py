"""Configuration: dataclass sections, named presets, type checking, and the values they imply.

A run is described by one :class:`RunConfig` made of sections (``data``, ``decompose``,
``tokenizer``, ``ar``, ``sample``). The dataclass defaults are the *smoke* scale; a preset
(``cartlib/presets/<name>.yaml``) is a small file that overrides some of them, optionally on top of
another preset (``base: tiny``). Every override is type-checked against the default it replaces,
and unknown names are refused with the closest valid name, so a typo never silently becomes a
smoke run.

The config owns what follows from it: :attr:`RunConfig.order` (the decomposition order the
tokenizer uses), :meth:`RunConfig.schedule`, :attr:`ARConfig.model_width`, and the variants the
ablation needs (:meth:`RunConfig.with_order`, :meth:`RunConfig.var_baseline`). An inconsistent
quantizer/order pair is refused when the config is built, and so is every number outside its
range (:mod:`cartlib.ranges`; the message names the setting, its value and the allowed range).
Notebook parameters are in :mod:`cartlib.params`.

Trained artifacts are keyed by :meth:`RunConfig.artifact_key`: a hash of every setting their
result depends on, the precision included (not the process count: :data:`FIXED_IN_KEYS`), so a
changed setting never reuses (or overwrites) a model trained under another.
``mixed_precision: auto`` (the small presets) is resolved for the machine's device by
:mod:`cartlib.hardware`.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cartlib import hardware
from cartlib.io import atomic_write_bytes, project_root
from cartlib.ranges import range_problem
from cartlib.schedule import TokenSchedule

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
    # --- the streaming data path (cartlib.data.stream); VAR's settings in the full-scale presets
    mid_ratio: float = 1.0  # shorter side resized to mid_ratio x resolution, then crop (VAR 1.125)
    random_crop: bool = False  # training: crop at a random position (VAR); False: the centre
    hflip: bool = False  # training: mirror a random half of the images
    views: int = 1  # token extraction views per image: 1 centre; 2 + mirror (LlamaGen); >2 + crops
    workers: int = 0  # DataLoader worker processes per training process (0: the main process)
    cache_bases: bool = True  # bases from the on-disk cache (small sets); False: per batch
    shard_size: int = 10_000  # images per token shard file (extraction resumes shard by shard)

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class DecomposeConfig:
    order: int = 3  # n in I = B_n + D_n + ... + D_1 (Eq. 6); 0 = no decomposition (VAR)
    alpha: float = 1.0  # smoothness weight (Eq. 4), paper: 1
    lam: float = 0.01  # edge-length weight (Eq. 4), paper: 0.01
    eps: float | None = None  # AT edge width; None = the solver's documented default
    kind: str = "base_detail"  # base_detail (Eq. 5) | intrinsic (albedo/shading) | specular

    def __post_init__(self) -> None:
        check_ranges(self)


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
    arch: str = "cartlib"  # cartlib (small, one ResBlock per level) | var (VAR's VQ-VAE layout,
    # loads vae_ch160v4096z32.pth: 2 ResBlocks per level, attention, quant_conv; channels % 32 == 0)
    micro_batch: int | None = None  # images per forward/backward and process; None = the whole
    # per-process batch; smaller = gradient accumulation (cartlib.fit chooses it at full scale)
    init_from: str | None = None  # VAR's released VQ-VAE (vae_ch160v4096z32.pth): installed,
    # strictly, as the finished tokenizer instead of training one (arch var, order 0)
    straight_through: str | None = None  # which parameters the decoder's gradient reaches through
    # the quantizer: "cartlib" (encoder, codebook and phi convs) | "var" (the encoder only, as
    # VAR's VQ-VAE); None = by arch ("var" for arch var, else "cartlib")

    def __post_init__(self) -> None:
        check_ranges(self)


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
    # VAR's transformer and schedule details (Tian et al. 2024, models/var.py, train.py). The
    # defaults are the plain model the smoke/tiny presets were tuned with; the full-scale presets
    # set them as VAR's training scripts do.
    attn_l2_norm: bool = False  # attention on L2-normalised q, k times a learned per-head scale
    drop_path: float | None = 0.0  # stochastic depth of the last block (linear from 0 at the
    # first); None = VAR's rule 0.1 * depth / 24
    shared_adaln: bool = False  # one adaLN projection for all blocks + a per-block offset (d36-s)
    init_adaln: float = 0.0  # adaLN shift/scale weights x this at init (VAR: 0.5; 0 = adaLN-Zero)
    init_adaln_gamma: float = 0.0  # adaLN gate weights x this at init (VAR: 1e-3 .. 5e-6)
    init_head: float = 0.1  # output head weights x this at init (VAR: 0.02)
    init_residual_scale: bool = False  # attn.proj, MLP fc2 weights / sqrt(2 depth) at init (VAR)
    lr_schedule: str = "cosine"  # cosine | lin0 (VAR: flat for 5% after warm-up, then linear)
    lr_end: float = 0.1  # final lr / peak lr (VAR's wpe: 0.1 for d16/d20, 0.01 for d24/d30)
    weight_decay_end: float | None = None  # None = constant; else cosine from weight_decay to
    # this over the run (VAR's twde: 0.08 for d30 and d36)
    # How one optimizer step of batch_size images is laid out on the devices (cartlib.fit chooses
    # it for full-scale runs; none of it changes what is learned, beyond float rounding):
    micro_batch: int | None = None  # images per forward/backward and process; None = the whole
    # per-process batch (batch_size / num_processes); smaller = gradient accumulation
    grad_ckpt: bool = False  # recompute each block's activations in backward
    fsdp: bool = False  # FSDP2 full sharding per block (accelerate on GPUs; gloo on 2+ CPU procs)
    # How the transformer computes (cartlib.model.transformer; speed only, equal results):
    attention: str = "auto"  # training attention: auto | sdpa (one call, boolean mask: the
    # reference) | per_step (one call per step on its key prefix) | flex (block-sparse
    # flex_attention); auto = per_step on CPU and CUDA
    compile: str | bool = "auto"  # torch.compile of each block: auto (CUDA on, CPU off) | bool

    @property
    def drop_path_rate(self) -> float:
        """Stochastic depth of the last block: ``drop_path``, or VAR's rule 0.1 * depth / 24."""
        return 0.1 * self.depth / 24 if self.drop_path is None else self.drop_path

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.attention not in ("auto", "sdpa", "per_step", "flex"):
            raise ConfigError(
                f"ar.attention={self.attention!r} is unknown: choose one of 'auto', 'sdpa', "
                "'per_step', 'flex' (the same results; auto picks the fastest for the device)"
            )
        if self.compile not in ("auto", True, False):
            raise ConfigError(
                f"ar.compile={self.compile!r} is unknown: choose 'auto' (on for CUDA, off on CPU), "
                "true or false"
            )
        if self.model_width % self.model_heads:
            raise ConfigError(
                f"ar.heads={self.model_heads} does not divide the transformer width "
                f"{self.model_width} (ar.width, or 64 * ar.depth): choose heads that divide it "
                "(VAR: heads = depth, width = 64 * depth)"
            )

    @property
    def model_width(self) -> int:
        """The transformer's width: ``width``, or VAR's rule 64 * depth."""
        return self.width or 64 * self.depth

    @property
    def model_heads(self) -> int:
        """The attention heads: ``heads``, or VAR's rule heads = depth."""
        return self.heads or self.depth


@dataclass
class SampleConfig:
    """Sampling defaults of a run (what its FID sample sets use); notebook 05 takes its own."""

    guidance: float = 2.0  # classifier-free guidance t (0 = off); paper/VAR FID: 1.5
    cfg_schedule: str = "linear"  # linear (VAR's ramp t * m / (M - 1)) | constant
    top_k: int = 0  # 0 = off; VAR's FID setting: 900 (of V = 4096)
    top_p: float = 1.0  # 1 = off; VAR's FID setting: 0.96
    temperature: float = 1.0
    rejection: int = 1  # candidates drawn per kept image (1 = off); the paper's "-re" rows
    per_class: int = 50  # images per class of an FID sample set (paper/VAR: 50 x 1000 classes)

    def generate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``cartlib.sample.generate`` these defaults stand for."""
        return {
            "cfg": self.guidance,
            "cfg_schedule": self.cfg_schedule,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "temperature": self.temperature,
            "rejection": self.rejection,
        }

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class RunConfig:
    name: str = "smoke"
    data: DataConfig = field(default_factory=DataConfig)
    decompose: DecomposeConfig = field(default_factory=DecomposeConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    ar: ARConfig = field(default_factory=ARConfig)
    # auto | no | bf16 | fp16: auto is what the device runs natively (cartlib.hardware)
    mixed_precision: str = "auto"
    num_processes: int = 1
    gpu_mem_gib: float = 80.0  # memory of one GPU, for the layout a full-scale run is planned to
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        check_ranges(self)
        check_quantizer_order(self.tokenizer, self.decompose)

    # ------------------------------------------------------------------ derived values
    @property
    def precision(self) -> str:
        """The concrete precision this run trains in: ``mixed_precision``, with ``auto``
        resolved for this machine's device (:func:`cartlib.hardware.resolve_precision`)."""
        return hardware.precision(self.mixed_precision)

    def resolved(self) -> RunConfig:
        """This config with ``mixed_precision`` concrete (what a stage folder records)."""
        if self.mixed_precision == "auto":
            return dataclasses.replace(self, mixed_precision=self.precision)
        return self

    @property
    def order(self) -> int:
        """The decomposition order n the tokenizer uses (0 = VAR's multi-scale, no details)."""
        return decomposition_order(self.tokenizer, self.decompose)

    def schedule(self) -> TokenSchedule:
        """The token schedule of this run (base scales, then the detail steps)."""
        return TokenSchedule.from_config(self.tokenizer, self.order)

    def with_order(self, order: int) -> RunConfig:
        """The same run at decomposition order ``order``: base-detail for n >= 1, VAR's
        multi-scale quantizer for n = 0 (the ablation's variants, notebook 06)."""
        quantizer = "base_detail" if order > 0 else "multiscale"
        return dataclasses.replace(
            self,
            decompose=dataclasses.replace(self.decompose, order=order),
            tokenizer=dataclasses.replace(self.tokenizer, quantizer=quantizer),
        )

    def with_quantizer(self, quantizer: str) -> RunConfig:
        """The same run with another quantizer; vanilla and multi-scale take order 0, base-detail
        keeps this config's order (or 3 when it had none)."""
        order = (self.decompose.order or 3) if quantizer == "base_detail" else 0
        return dataclasses.replace(
            self,
            decompose=dataclasses.replace(self.decompose, order=order),
            tokenizer=dataclasses.replace(self.tokenizer, quantizer=quantizer),
        )

    def with_flat_base(self) -> RunConfig:
        """Paper Table 4's "flat" variant: every base step quantized at the full latent size
        (residual VQ), as many base steps as before, details unchanged."""
        t = self.tokenizer
        full = (t.base_patch_nums[-1],) * len(t.base_patch_nums)
        return self.updated(tokenizer={"base_patch_nums": full})

    def updated(self, **sections: Any) -> RunConfig:
        """A type-checked copy with nested overrides, e.g. ``cfg.updated(ar={"depth": 4})``."""
        return apply_overrides(self, sections)

    def with_train_seed(self, seed: int) -> RunConfig:
        """The same run trained from another seed: tokenizer and transformer (the training
        seeds of the ablation, notebook 06)."""
        return self.updated(tokenizer={"seed": seed}, ar={"seed": seed})

    def tokenizer_variants(self) -> dict[str, RunConfig]:
        """The four tokenizers of Figure 11 (notebook 03) at this run's settings: vanilla
        residual VQ at full size with as many steps as CART has token maps, VAR's multi-scale,
        and base-detail without and with the carried detail (``tokenizer.detail_carry``)."""
        cart = self.with_quantizer("base_detail")
        steps = cart.schedule().n_steps
        return {
            "vanilla": self.with_quantizer("vanilla").updated(tokenizer={"rq_depth": steps}),
            "multiscale": self.with_quantizer("multiscale"),
            "base_detail": cart.updated(tokenizer={"detail_carry": False}),
            "base_detail+carry": cart.updated(tokenizer={"detail_carry": True}),
        }

    def var_baseline(self) -> RunConfig:
        """This run's VAR baseline: the same everything at order 0 (multi-scale quantizer)."""
        return self.with_order(0)

    def tokenizer_sections(self) -> tuple[str, ...]:
        """The config sections a trained tokenizer depends on."""
        return ("data", "decompose", "tokenizer") if self.order > 0 else ("data", "tokenizer")

    def digest(self, sections: tuple[str, ...]) -> str:
        """A short stable hash of the named sections or top-level settings."""
        d = self.to_dict()
        d["mixed_precision"] = self.precision  # auto keys as what it resolves to here
        d.update(FIXED_IN_KEYS)
        for section, fixed in FIXED_IN_KEYS_OF.items():
            d[section].update(fixed)
        for section, names in NOT_IN_KEYS_OF.items():
            for name in names:
                d[section].pop(name)
        for section, defaults in IN_KEYS_UNLESS_DEFAULT.items():
            for name, default in defaults.items():
                if d[section][name] == default:
                    d[section].pop(name)
        blob = json.dumps({s: d[s] for s in sections}, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:8]

    def stage_folder(self, stage: str) -> str:
        """The folder name a trained ``stage`` ("tokenizer" or "ar") of this config lives in:
        ``tokenizer-<quantizer>-o<order>-<key>`` or ``ar-d<depth>-<quantizer>-o<order>-<key>``
        (:meth:`artifact_key`)."""
        kind = f"{self.tokenizer.quantizer}-o{self.order}-{self.artifact_key(stage)}"
        return f"tokenizer-{kind}" if stage == "tokenizer" else f"ar-d{self.ar.depth}-{kind}"

    def artifact_key(self, stage: str) -> str:
        """The hash that names a trained ``stage`` ("tokenizer" or "ar"): its sections (the
        transformer's include the tokenizer's) and every top-level setting but the name, as
        the precision (``auto`` counted as what it resolves to) and ``num_processes`` change the
        trained weights too. A finished model is opened at any precision
        (:mod:`cartlib.runs`); training anew keys by it."""
        stages = {"tokenizer": self.tokenizer_sections(), "ar": (*self.tokenizer_sections(), "ar")}
        if stage not in stages:
            raise _unknown("stage", stage, stages)
        run_wide = tuple(
            f.name
            for f in dataclasses.fields(self)
            if f.name not in SECTIONS and f.name not in NOT_IN_KEYS
        )
        return self.digest((*stages[stage], *run_wide))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def decomposition_order(tokenizer: TokenizerConfig, decompose: DecomposeConfig) -> int:
    """The one rule: only the base-detail quantizer decomposes; the others work at order 0."""
    return decompose.order if tokenizer.quantizer == "base_detail" else 0


def check_quantizer_order(tokenizer: TokenizerConfig, decompose: DecomposeConfig) -> None:
    """Refuse a quantizer/order pair that would silently mean something else."""
    q, n = tokenizer.quantizer, decompose.order
    if q == "base_detail" and n == 0:
        raise ConfigError(
            "quantizer='base_detail' with decompose.order=0 has no details: it is VAR's "
            "multi-scale tokenizer. Set quantizer='multiscale' (papermill: -p quantizer "
            "multiscale), or an order >= 1 (-p order 3)"
        )
    if q in ("vanilla", "multiscale") and n != 0:
        raise ConfigError(
            f"quantizer={q!r} does not decompose images, but decompose.order={n}: set "
            f"decompose.order=0 (papermill: -p order 0), or quantizer='base_detail' to use "
            f"order {n} (cfg.with_order(n) / cfg.with_quantizer(q) change both together)"
        )


def check_ranges(section: Any) -> None:
    """Refuse a config section (or the RunConfig) with a setting outside its range."""
    problem = range_problem(section)
    if problem:
        raise ConfigError(problem)


SECTIONS = ("data", "decompose", "tokenizer", "ar", "sample")
NOT_IN_KEYS = ("name", "gpu_mem_gib")  # top-level settings that change no trained result
# top-level settings that change no trained result either, hashed at the value every key was made
# with when they still counted (so existing keys stay valid): every process count trains the same
# steps (each process draws its share of one global batch; checkpoints reshard), so a run moved
# from 16 A100s to 8 H200s resumes where it was
FIXED_IN_KEYS = {"num_processes": 1}
# settings of a section that change no trained result either, hashed at one fixed value (the one
# the shipped checkpoints were trained with, so their keys stand): how often a run saves. A save
# draws nothing from the training's random streams (tests/test_train.py), so a run whose
# ckpt_every is changed resumes where it was instead of starting again
FIXED_IN_KEYS_OF = {"tokenizer": {"ckpt_every": 200}, "ar": {"ckpt_every": 200}}
# settings of a section that change how fast, not what, a stage computes
# what :meth:`RunConfig.stage_folder` names a folder: the stage, then the artifact key last
STAGE_FOLDER = re.compile(r"(?P<stage>tokenizer|ar)-.+-(?P<key>[0-9a-f]{8})")
# settings added after models were trained and shipped: counted only when set, so that every
# earlier model keeps its key
IN_KEYS_UNLESS_DEFAULT = {"tokenizer": {"init_from": None, "straight_through": None}}
NOT_IN_KEYS_OF = {
    "data": ("workers", "shard_size"),
    "tokenizer": ("micro_batch",),
    "ar": ("micro_batch", "grad_ckpt", "fsdp", "attention", "compile"),
}


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
            hint = ""
            if isinstance(value, str) and _is_number(value):
                hint = f": write it without quotes ({value}), with a decimal point in YAML"
            raise ConfigError(
                f"{where}={value!r} must be a number (got {type(value).__name__}){hint}"
            )
        if not math.isfinite(value):
            raise ConfigError(f"{where}={value!r} must be a finite number")
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
        if isinstance(value, bool):  # YAML reads an unquoted no/yes/off/on as a boolean
            raise ConfigError(
                f"{where}={value!r} must be a string (got bool): YAML reads an unquoted no, yes, "
                f'off or on as {value}; quote it, e.g. {where.rsplit(".", 1)[-1]}: "no"'
            )
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
# The paper's depths: notebook 04's ``-p depth 30`` on a small preset means CART-d30.
DEPTH_PRESETS = (16, 20, 24, 30)


def preset_for_depth(preset: str, depth: int | None) -> str:
    """``-p depth 30`` on a small preset (notebook 04's default ``tiny``, or ``smoke``) means
    CART-d30 (cart-d30-256), not a small run with 30 blocks: a depth with a paper preset selects
    that preset."""
    if depth in DEPTH_PRESETS and preset in ("smoke", "tiny"):
        return f"cart-d{depth}-256"
    return preset


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def _preset_dict(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        raise _unknown("preset", name, available_presets())
    if name in seen:
        raise ConfigError(f"preset {name!r} inherits from itself through {' -> '.join(seen)}")
    raw = read_yaml(path) or {}
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

    ``name`` may also be a YAML file of settings (a ``.yaml`` path, relative to the project
    root unless absolute): a run's ``config.yaml``, so a notebook opens a run folder trained
    with settings no preset has (``papermill 05_sampling.ipynb -p run_dir R -p preset
    R/config.yaml``). ``overrides`` use the same nested shape as the preset files, e.g.
    ``load_preset("tiny", ar={"depth": 4})``.
    """
    if str(name).endswith((".yaml", ".yml")):
        path = Path(name).expanduser()
        path = path if path.is_absolute() else project_root() / path
        if not path.is_file():
            raise ConfigError(
                f"preset={name!r}: no such settings file ({path}); give a preset "
                f"({', '.join(available_presets())}) or the config.yaml of a run folder"
            )
        cfg = load_config(path)
        return apply_overrides(cfg, overrides) if overrides else cfg
    merged = _preset_dict(name)
    merged["name"] = name
    cfg = apply_overrides(RunConfig(), merged)
    return apply_overrides(cfg, overrides) if overrides else cfg


def save_config(cfg: RunConfig, path: str | Path) -> None:
    atomic_write_bytes(path, yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False).encode())


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's numbers: PyYAML (YAML 1.1) reads ``1e-4`` (no decimal point) as the
    string "1e-4"; here it is the float, as in every other YAML reader and in Python."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_yaml(path: str | Path) -> Any:
    """The YAML file ``path`` (:class:`_Loader`); a syntax slip is a ConfigError naming the file
    and the line."""
    path = Path(path)
    try:
        return yaml.load(path.read_text(), Loader=_Loader)  # a SafeLoader: no objects
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML{line}: {what}. Fix it and run again") from None


def load_config(path: str | Path) -> RunConfig:
    """The :class:`RunConfig` a YAML file (written by :func:`save_config`, or by hand) holds;
    every setting checked as a preset's is, the file named in the error."""
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} holds a {type(raw).__name__}, not a mapping of settings")
    try:
        return apply_overrides(RunConfig(), raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
