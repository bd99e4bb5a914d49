"""Recursive specularity factorization: I = A_n + E_n + ... + E_1 (paper, "Lighting Control").

Following the dichromatic reflection model, an image is a diffuse part plus specular parts,
I = A + E. Saini & Narayanan (CVPR 2024, "Specularity Factorization for Low-Light Enhancement")
split off the specular part **recursively**, relaxing the sparsity each time, so that
A_0 = I, A_{k-1} = A_k + E_k and

    I = A_n + E_n + E_{n-1} + ... + E_1            (the paper uses n = 4)

where E_1 is the sparsest, brightest factor (highlights) and each later factor reaches further
into the image. Each of their factorization modules solves x = A + E with a group-sparse E,

    min_E  1/2 ||A_{k-1} - E||^2 + tau_k sum_p ||E_p||_2          (E_p: the RGB vector of pixel p)

by unrolled ADMM with a few learned scalars (their RSFNet). The learned scalars are not available
here, so cartlib takes the weight-free core of that step, its closed-form proximal solution, the
group soft-threshold

    E_k = max(0, 1 - tau_k / ||A_{k-1,p}||) A_{k-1,p},     A_k = A_{k-1} - E_k,

with thresholds set from the image: tau_k is the (1 - s_k) quantile of the pixels' colour norms
||I_p||, the share s_k of pixels factor k touches growing log-evenly from ``first_share`` (E_1:
the brightest 5 %) to ``last_share``. Consequences, all exact: every factor is non-negative (a
non-negative multiple of a non-negative pixel), keeps the pixel's chromaticity (the shrinkage
acts on the RGB vector as a whole, as RSFNet's does), and the sum telescopes to I.
In closed form A_k = I * min(1, tau_k / ||I_p||): the diffuse base A_n is the image with its
brightest pixels dimmed to tau_n, and adding E_n, ..., E_1 restores the light step by step —
what Figure 9 varies. Shapes: images (B, 3, H, W), non-negative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FIRST_SHARE = 0.05  # share of pixels the first (sparsest) specular factor E_1 touches
LAST_SHARE = 0.6  # share of pixels the last factor E_n touches


@dataclass
class Specular:
    """``diffuse`` = A_n; ``factors`` = [E_1 (sparsest), ..., E_n]; ``bases`` = [A_1, ..., A_n]
    (A_k = I - E_1 - ... - E_k, what the tokenizer encodes); ``thresholds`` (B, n)."""

    diffuse: torch.Tensor
    factors: list[torch.Tensor]
    bases: list[torch.Tensor]
    thresholds: torch.Tensor

    @property
    def order(self) -> int:
        return len(self.factors)

    def reconstruct(self, upto: int | None = None) -> torch.Tensor:
        """A_n + E_n + ... + E_{n-upto+1}: the diffuse base with the ``upto`` coarsest specular
        factors added (None: all of them, which gives the image back)."""
        upto = self.order if upto is None else upto
        out = self.diffuse.clone()
        for e in self.factors[::-1][:upto]:
            out += e
        return out


def shares(order: int, first: float = FIRST_SHARE, last: float = LAST_SHARE) -> list[float]:
    """s_1..s_n: the share of pixels each factor touches, log-evenly spaced from first to last."""
    if order < 1:
        raise ValueError(f"order={order}: the specular factorization needs at least one factor")
    if not 0 < first <= last < 1:
        raise ValueError(f"shares must satisfy 0 < first={first} <= last={last} < 1")
    if order == 1:
        return [first]
    step = (math.log(last) - math.log(first)) / (order - 1)
    return [math.exp(math.log(first) + k * step) for k in range(order)]


def group_shrink(a: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """The proximal operator of tau * sum_p ||E_p||_2: max(0, 1 - tau / ||a_p||) a_p.
    a (B, 3, H, W), tau (B,) -> (B, 3, H, W)"""
    norm = a.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (B, 1, H, W)
    return (1 - tau.view(-1, 1, 1, 1) / norm).clamp_min(0) * a


def specular(
    x: torch.Tensor,
    order: int = 4,
    first_share: float = FIRST_SHARE,
    last_share: float = LAST_SHARE,
) -> Specular:
    """The order-n recursive specularity factorization of non-negative images x (B, 3, H, W)
    (module docstring): I = A_n + E_n + ... + E_1, every factor >= 0."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"x must be (B, 3, H, W), got shape {tuple(x.shape)}")
    if bool((x < 0).any()):
        raise ValueError(
            f"x must be non-negative (min {x.min().item():.3g}); pass images in [0, 1]"
        )
    norms = x.norm(dim=1).flatten(1).float()  # (B, H*W)
    q = torch.tensor([1 - s for s in shares(order, first_share, last_share)], device=x.device)
    taus = torch.quantile(norms, q, dim=1).T.to(x.dtype)  # (B, n), non-increasing in k
    a, factors, bases = x, [], []
    for k in range(order):
        e = group_shrink(a, taus[:, k])  # E_k
        a = a - e  # A_k
        factors.append(e)
        bases.append(a)
    return Specular(diffuse=a, factors=factors, bases=bases, thresholds=taus)
