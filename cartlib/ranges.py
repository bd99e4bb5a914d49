"""The allowed range of every numeric setting of a run config, checked when it is built.

:data:`RANGES` gives, per config section (``""`` = the top level), each numeric setting's
:class:`Range` (for a tuple setting: each item's); :data:`CHOICES` the allowed strings.
:func:`range_problem` says what is wrong with a section (setting, value, allowed range); the
section dataclasses of :mod:`cartlib.config` raise it as a ``ConfigError`` from ``__post_init__``,
so an override (``-p depth -1``), a preset or ``dataclasses.replace`` are all checked.
``tests/test_robustness.py`` fails on a numeric setting without an entry here.

Ranges are what the code can run, not what is sensible: ``decompose.order`` is capped at
:data:`MAX_ORDER` because the paper ablates n = 0..4 (Table 5: the base is over-smoothed beyond
3) and a few more smoothings leave a flat base.
"""

from __future__ import annotations

import functools
import math
import typing
from dataclasses import dataclass
from typing import Any

from cartlib import hardware

MAX_ORDER = 6


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric setting: ``lo``..``hi``, either end open or absent."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    odd: bool = False

    def __contains__(self, v: float) -> bool:
        return (
            math.isfinite(v)
            and (self.lo is None or (v > self.lo if self.lo_open else v >= self.lo))
            and (self.hi is None or (v < self.hi if self.hi_open else v <= self.hi))
            and (not self.odd or v % 2 == 1)
        )

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            left, right = "(["[not self.lo_open], ")]"[not self.hi_open]
            text = f"in {left}{self.lo:g}, {self.hi:g}{right}"
        else:
            text = f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return text + (" and odd" if self.odd else "")


AT_LEAST_1, NON_NEGATIVE, POSITIVE = Range(1), Range(0), Range(0, lo_open=True)
PROBABILITY = Range(0, 1, hi_open=True)
# section ("" = top level) -> setting -> allowed values (each item, for tuples); None is always
# allowed where the type says so. A numeric setting without an entry fails tests/test_robustness.
RANGES: dict[str, dict[str, Range]] = {
    "data": {
        "resolution": Range(8),
        **dict.fromkeys(("train_limit", "test_limit", "views", "shard_size"), AT_LEAST_1),
        "mid_ratio": Range(1),  # resize the short side to at least the crop
        "workers": NON_NEGATIVE,
    },
    "decompose": {
        "order": Range(0, MAX_ORDER),
        **dict.fromkeys(("alpha", "lam", "eps"), POSITIVE),
    },
    "tokenizer": {
        **dict.fromkeys(("channels", "ch_mult", "latent_channels", "base_patch_nums"), AT_LEAST_1),
        **dict.fromkeys(("depth_per_factor", "rq_depth", "steps", "batch_size"), AT_LEAST_1),
        "codebook_size": Range(2),
        "phi_kernel": Range(1, odd=True),
        **dict.fromkeys(("phi_share", "gan_start", "dead_code_every", "seed"), NON_NEGATIVE),
        **dict.fromkeys(("beta", "w_rec", "w_lpips", "w_gan", "w_base"), NON_NEGATIVE),
        "lr": POSITIVE,
        **dict.fromkeys(("ckpt_every", "micro_batch"), AT_LEAST_1),
    },
    "ar": {
        **dict.fromkeys(("depth", "width", "heads", "steps", "batch_size"), AT_LEAST_1),
        **dict.fromkeys(("mlp_ratio", "lr", "grad_clip"), POSITIVE),
        **dict.fromkeys(("dropout", "cond_drop"), PROBABILITY),
        **dict.fromkeys(("weight_decay", "warmup", "seed"), NON_NEGATIVE),
        "ckpt_every": AT_LEAST_1,
        "drop_path": PROBABILITY,
        **dict.fromkeys(("init_adaln", "init_adaln_gamma", "init_head"), NON_NEGATIVE),
        "lr_end": Range(0, 1),
        "weight_decay_end": NON_NEGATIVE,
        "micro_batch": AT_LEAST_1,
    },
    "sample": {
        **dict.fromkeys(("guidance", "top_k", "temperature"), NON_NEGATIVE),
        "top_p": Range(0, 1, lo_open=True),
        **dict.fromkeys(("rejection", "per_class"), AT_LEAST_1),
    },
    "": {"num_processes": AT_LEAST_1, "gpu_mem_gib": POSITIVE},
}
CHOICES: dict[str, dict[str, tuple[str, ...]]] = {
    "data": {"bad_files": ("error", "skip")},
    "tokenizer": {
        "quantizer": ("vanilla", "multiscale", "base_detail"),
        "arch": ("cartlib", "var"),
        "straight_through": ("cartlib", "var"),
    },
    "ar": {"lr_schedule": ("cosine", "lin0")},
    "sample": {"cfg_schedule": ("linear", "constant")},
    "": {"mixed_precision": hardware.CHOICES},  # auto | no | bf16 | fp16
}
SECTION_OF = {"DataConfig": "data", "DecomposeConfig": "decompose", "TokenizerConfig": "tokenizer",
              "ARConfig": "ar", "SampleConfig": "sample", "RunConfig": ""}  # fmt: skip


@functools.cache
def _optional(cls: type, name: str) -> bool:
    """Whether the setting ``name`` of config section ``cls`` may be None."""
    return type(None) in typing.get_args(typing.get_type_hints(cls)[name])


def range_problem(obj: Any) -> str | None:
    """What is wrong with the first setting of config section ``obj`` (a dataclass of
    :mod:`cartlib.config`) that is outside its range, or None."""
    section = SECTION_OF[type(obj).__name__]
    prefix = f"{section}." if section else ""
    for name, rng in RANGES[section].items():
        value = getattr(obj, name)
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if v is None:
                continue
            where = f"{prefix}{name}={value!r}"
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                return f"{where} must be a number, got {type(v).__name__}"
            if v not in rng:
                each = "each item " if value is not v else ""
                return f"{where} is out of range: {each}must be {rng}"
        if isinstance(value, (tuple, list)) and not value:
            return f"{prefix}{name} is empty: give at least one value {rng}"
    for name, allowed in CHOICES.get(section, {}).items():
        if getattr(obj, name) is None and _optional(type(obj), name):
            continue  # None: the setting's default rule
        if getattr(obj, name) not in allowed:
            return (
                f"{prefix}{name}={getattr(obj, name)!r} is not allowed: choose one of "
                f"{', '.join(map(repr, allowed))}"
            )
    return None
