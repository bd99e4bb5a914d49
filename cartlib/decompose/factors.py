"""A decomposition as the tokenizer sees it: a model space and the cumulative bases B_1..B_n.

The base-detail quantizer (Alg. 1) is written for any additive split of an image into a base and
n detail factors, X = F_0 + F_n + ... + F_1: it encodes X and the cumulative bases
B_k = F_0 + F_n + ... + F_{k+1} (so B_n = F_0 and D_k = B_{k-1} - B_k = F_k, Eq. 8 in feature
space). Which split is a choice in the config, ``DecomposeConfig.kind``:

* ``base_detail`` (paper Eq. 5-6): X = I, B_k = AT(B_{k-1}), any order n.
* ``intrinsic`` ("Recoloring"): X = log I in normalised form, one detail factor (order 1):
  B_1 = log albedo, D_1 = log shading (:mod:`cartlib.decompose.intrinsic`). The tokenizer learns the
  log image and decodes by exponentiation, as the paper does.
* ``specular`` ("Lighting Control"): X = I, B_k = A_k, D_k = E_k, order n (paper: 4)
  (:mod:`cartlib.decompose.specular`).

Model space. The tokenizer encodes and decodes X, not I. For ``intrinsic``,
X = (log(I + delta) - log delta) / L with L = log(1 + delta) - log delta, so X is in [0, 1] for
I in [0, 1] and the map is affine in log I: log A + log S = log(I + delta) becomes
X = B_1 + log S / L exactly. delta = :data:`LOG_OFFSET` (0.05) keeps the log finite at black and
stops it from spending half of [0, 1] on the darkest 5 % of intensities (delta = 1/255 would). The
decomposition of I + delta, not I, is the honest price of the log. For the other kinds X = I.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cartlib.decompose.hierarchy import base_detail
from cartlib.decompose.intrinsic import intrinsic
from cartlib.decompose.specular import specular

KINDS = ("base_detail", "intrinsic", "specular")
LOG_OFFSET = 0.05  # delta in log(I + delta), intrinsic kind only
_LOG_RANGE = math.log(1 + LOG_OFFSET) - math.log(LOG_OFFSET)  # L


@dataclass(frozen=True)
class Factorization:
    """One decomposition kind at one order, with the Ambrosio-Tortorelli settings of
    ``base_detail`` (``at``: alpha, lam, eps)."""

    kind: str = "base_detail"
    order: int = 3
    at: tuple[tuple[str, float | None], ...] = ()

    def __post_init__(self) -> None:
        check_kind(self.kind, self.order)

    @classmethod
    def from_config(cls, decompose, order: int) -> Factorization:
        """From a :class:`cartlib.config.DecomposeConfig` and the order the tokenizer uses."""
        at = (("alpha", decompose.alpha), ("lam", decompose.lam), ("eps", decompose.eps))
        return cls(getattr(decompose, "kind", "base_detail"), order, at)

    # ------------------------------------------------------------------ model space
    @property
    def logarithmic(self) -> bool:
        return self.kind == "intrinsic" and self.order > 0

    def to_model(self, images: torch.Tensor) -> torch.Tensor:
        """I (B, 3, H, W) in [0, 1] -> X, what the tokenizer encodes (module docstring)."""
        if not self.logarithmic:
            return images
        return log_normalise((images.float() + LOG_OFFSET).log()).to(images.dtype)

    def from_model(self, x: torch.Tensor) -> torch.Tensor:
        """X -> I, clamped to [0, 1] (intrinsic: exponentiation, the paper's reconstruction)."""
        if not self.logarithmic:
            return x.clamp(0, 1)
        return (log_denormalise(x.float()).exp() - LOG_OFFSET).clamp(0, 1)

    # ------------------------------------------------------------------ bases
    @torch.no_grad()
    def bases(self, images: torch.Tensor) -> torch.Tensor:
        """B_1..B_n of images (B, 3, H, W) in [0, 1], in model space. -> (B, n, 3, H, W)"""
        x = images.float()
        with torch.autocast(x.device.type, enabled=False):  # solvers in full precision
            if self.kind == "base_detail":
                out = base_detail(x, order=self.order, **dict(self.at)).bases
            elif self.kind == "intrinsic":
                split = intrinsic(x + LOG_OFFSET)
                out = [log_normalise(split.log_albedo)]
            else:
                out = specular(x, order=self.order).bases
        return torch.stack(out, 1).to(images.dtype)

    def names(self) -> tuple[str, list[str]]:
        """(name of the base, names of the detail factors in schedule order: D_n first)."""
        n = self.order
        if self.kind == "intrinsic":
            return "albedo", ["shading"]
        if self.kind == "specular":
            return f"diffuse A{n}", [f"E{t}" for t in range(n, 0, -1)]
        return f"base B{n}", [f"D{t}" for t in range(n, 0, -1)]

    def step_labels(self, schedule) -> list[str]:
        """A label for every step of ``schedule`` naming the factor it adds."""
        base, details = self.names()
        labels = []
        for s in schedule:
            if s.kind == "base":
                labels.append(f"{base.split()[0]} {s.h}x{s.w}" if self.order else f"{s.h}x{s.w}")
            else:
                labels.append(details[self.order - s.factor])
        return labels


def log_normalise(log_x: torch.Tensor) -> torch.Tensor:
    """(log x - log delta) / L: the intrinsic model space's affine map of a log image."""
    return (log_x - math.log(LOG_OFFSET)) / _LOG_RANGE


def log_denormalise(x: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`log_normalise`: model space -> log(I + delta) (or log A, log S)."""
    return x * _LOG_RANGE + math.log(LOG_OFFSET)


def check_kind(kind: str, order: int) -> None:
    """Refuse a decomposition kind that does not exist or cannot have ``order`` factors."""
    if kind not in KINDS:
        raise ValueError(f"decompose kind={kind!r} is unknown: choose one of {', '.join(KINDS)}")
    if kind == "intrinsic" and order not in (0, 1):
        raise ValueError(
            f"the intrinsic decomposition has one detail factor (shading), got order={order}: set "
            "decompose.order=1 (papermill: -p order 1); more shading steps come from "
            "tokenizer.depth_per_factor (the paper: 7 albedo + 7 shading token maps)"
        )
