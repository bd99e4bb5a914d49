"""Hierarchical base-detail decomposition of order n (Eq. 5-6).

B_0 = I, B_k = AT(B_{k-1}) (Ambrosio-Tortorelli smoothing, Eq. 4), D_k = B_{k-1} - B_k, so

    I = B_n + D_n + D_{n-1} + ... + D_1            (Eq. 6)

holds to float rounding (the sum telescopes). D_1 holds the finest details, D_n the coarsest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from cartlib.decompose.mumford_shah import ambrosio_tortorelli, check_input


@dataclass
class Decomposition:
    """The order-n decomposition of a batch of images (all tensors (B, C, H, W) unless noted).

    ``base`` = B_n; ``details`` = [D_1 (finest), ..., D_n (coarsest)]; ``bases`` = [B_1, ...,
    B_n] (the tokenizer encodes each, Eq. 7); ``edges`` = [s_1, ..., s_n], (B, 1, H, W), the
    edge map of the AT step that produced B_k. order 0: base = I and the lists are empty.
    """

    base: torch.Tensor
    details: list[torch.Tensor]
    bases: list[torch.Tensor] = field(default_factory=list)
    edges: list[torch.Tensor] = field(default_factory=list)

    @property
    def order(self) -> int:
        return len(self.details)

    def reconstruct(self) -> torch.Tensor:
        """B_n + D_n + ... + D_1 (Eq. 6), which equals the image to float rounding."""
        out = self.base.clone()
        for d in reversed(self.details):
            out += d
        return out


def base_detail(x: torch.Tensor, order: int = 3, **at_params) -> Decomposition:
    """The order-``order`` base-detail decomposition of images x (B, C, H, W) in [0, 1] (Eq. 6).

    ``at_params`` go to :func:`~cartlib.decompose.ambrosio_tortorelli` (alpha, lam, eps, solver
    settings; the paper: alpha=1, lam=0.01, order=3).
    """
    if isinstance(order, bool) or not isinstance(order, int) or order < 0:
        raise ValueError(
            f"order={order!r} must be an integer >= 0 (0 = no decomposition; the paper uses 3)"
        )
    if at_params.get("return_info"):
        raise ValueError(
            "return_info is not available through base_detail; call "
            "ambrosio_tortorelli(x, return_info=True) for one level"
        )
    check_input(x)
    bases, edges, details = [], [], []
    prev, s = x, None  # B_0 = I
    for _ in range(order):
        # B_k = AT(B_{k-1}); the edges of B_k are nearly those of B_{k-1}: warm start from them
        b, s = ambrosio_tortorelli(prev, validate=False, s_init=s, **at_params)
        details.append(prev - b)  # D_k = B_{k-1} - B_k
        bases.append(b)
        edges.append(s)
        prev = b
    return Decomposition(base=prev, details=details, bases=bases, edges=edges)


# ------------------------------------------------------------------ measures and frequency splits
@dataclass
class DetailShare:
    """How much of a set of images the details carry, relative to the images' variance.

    ``total`` = ||I - B_n||^2 / (N Var(I)); ``layers`` = [||D_1||^2, ..., ||D_n||^2] / (N Var(I))
    (finest first, as :attr:`Decomposition.details`). N counts every value of the batch
    (images x channels x pixels) and Var(I) is the variance of all of them together (one number
    for the set, not per image). The layers need not sum to ``total``: D_k are not orthogonal.
    """

    total: float
    layers: list[float]


def detail_share(x: torch.Tensor, order: int = 3, dec: Decomposition | None = None, **at_params):
    """The detail share of images x (B, C, H, W) in [0, 1] under the order-``order`` hierarchy
    (:func:`base_detail` with ``at_params``, the config's defaults when none), or under ``dec``
    when given (a decomposition of x). -> :class:`DetailShare`.

    A share of 1 % means the details hold a hundredth of the images' variance: what Alg. 1's
    detail steps can add to a reconstruction of the base, at most.
    """
    dec = base_detail(x, order, **at_params) if dec is None else dec
    var = x.double().var(unbiased=False).item()
    if var < 1e-12:
        raise ValueError(f"Var(I) = {var:.2g}: the images are one flat value, no share is defined")
    n = x.numel()

    def share(t: torch.Tensor) -> float:
        return t.double().square().sum().item() / (n * var)

    return DetailShare(total=share(x - dec.base), layers=[share(d) for d in dec.details])


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation sum |grad x| of each image (B, C, H, W) -> (B,)."""
    dh = (x[..., 1:, :] - x[..., :-1, :]).abs().sum((1, 2, 3))
    dw = (x[..., :, 1:] - x[..., :, :-1]).abs().sum((1, 2, 3))
    return dh + dw


def lowpass_dct(x: torch.Tensor, radius: float) -> torch.Tensor:
    """Frequency split: keep the DCT-II coefficients (i, j) with sqrt(i^2 + j^2) < radius (in
    cycles per 2 image sides), the ideal low-pass of DCT-based decompositions. (B, C, H, W)."""
    from scipy.fft import dctn, idctn

    coef = dctn(x.detach().cpu().double().numpy(), type=2, axes=(-2, -1), norm="ortho")
    i = torch.arange(x.shape[-2], dtype=torch.float64)[:, None]
    j = torch.arange(x.shape[-1], dtype=torch.float64)[None, :]
    coef *= ((i.square() + j.square()).sqrt() < radius).numpy()
    out = idctn(coef, type=2, axes=(-2, -1), norm="ortho")
    return torch.from_numpy(out).to(x)


def lowpass_gaussian(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Frequency split: Gaussian blur with standard deviation ``sigma`` pixels (reflecting
    borders). (B, C, H, W)."""
    r = max(1, min(int(3 * sigma + 0.5), min(x.shape[-2:]) - 1))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum())[None, None]  # (1, 1, 2r+1)
    b, c, h, w = x.shape
    y = F.pad(x.reshape(b * c, 1, h, w), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k[..., None, :])  # along W
    y = F.conv2d(y, k[..., :, None])  # along H
    return y.reshape(b, c, h, w)


def matched_lowpass(x: torch.Tensor, base: torch.Tensor, kind: str) -> tuple[torch.Tensor, float]:
    """The ``kind`` ("dct" or "gaussian") low-pass of x that removes as much detail energy
    ||x - base||^2 as ``base`` does (bisection on its parameter). -> (low-pass, parameter)."""
    target = (x - base).square().mean().item()
    if kind == "gaussian":
        lo, hi, fn, coarser = 0.05, float(max(x.shape[-2:])), lowpass_gaussian, 1
    elif kind == "dct":
        lo, hi, fn, coarser = 0.5, float(sum(x.shape[-2:])), lowpass_dct, -1
    else:
        raise ValueError(f"kind={kind!r} is not known; use 'dct' or 'gaussian'")
    for _ in range(40):
        mid = (lo * hi) ** 0.5
        removed = (x - fn(x, mid)).square().mean().item()
        if (removed > target) == (coarser > 0):
            hi = mid
        else:
            lo = mid
    return fn(x, mid), mid


def edge_sharpness(base: torch.Tensor, image: torch.Tensor, top: float = 0.05) -> torch.Tensor:
    """Mean |grad base| / mean |grad image| over the ``top`` share of pixels with the strongest
    image gradients: 1 = the image's strongest edges are kept as steep, 0 = flattened. -> (B,)"""
    gi, gb = _grad_norm(image), _grad_norm(base)  # (B, H*W)
    k = max(1, int(top * gi.shape[1]))
    idx = gi.topk(k, dim=1).indices
    return gb.gather(1, idx).mean(1) / gi.gather(1, idx).mean(1).clamp_min(1e-12)


def ringing(base: torch.Tensor, image: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Mean overshoot of ``base`` beyond the image's local range (min..max in a (2 radius + 1)^2
    window), the Gibbs ringing of low-pass filters; 0 for averaging filters. -> (B,)"""
    k = 2 * radius + 1
    hi = F.max_pool2d(image, k, stride=1, padding=radius)
    lo = -F.max_pool2d(-image, k, stride=1, padding=radius)
    return ((base - hi).clamp_min(0) + (lo - base).clamp_min(0)).mean((1, 2, 3))


def _grad_norm(x: torch.Tensor) -> torch.Tensor:
    """|grad x| per pixel (forward differences, summed over channels). -> (B, H*W)"""
    dh = F.pad(x[..., 1:, :] - x[..., :-1, :], (0, 0, 0, 1))
    dw = F.pad(x[..., :, 1:] - x[..., :, :-1], (0, 1))
    return (dh.square() + dw.square()).sum(1).sqrt().flatten(1)
