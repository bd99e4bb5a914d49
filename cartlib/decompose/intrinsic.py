"""Weight-free intrinsic decomposition: log I = log A + log S (paper, "Recoloring ...").

The paper models an image as albedo times shading, I = A * S (A: (H, W, 3) colour of the surfaces,
S: (H, W, 1) the light falling on them), works with the additive form log I = log A + log S and
reconstructs by exponentiation, I = exp(log A + log S). It takes A and S from a learned network
(Careaga & Aksoy 2023) whose weights are not available here, so cartlib uses the classic,
weight-free **Retinex** split (Land & McCann 1971; Horn 1974; with Funt et al.'s colour cue):

1. log-luminance l = mean_c log I_c (B, 1, H, W) and log-chromaticity c = log I - l (B, 3, H, W);
2. every forward difference of l is an **albedo edge** when the luminance jumps
   (|dl| > ``lum_edge``) or the chromaticity changes (|dc| > ``chroma_edge``); the remaining, small
   and colourless differences are **shading** gradients;
3. log S integrates those shading gradients: the least-squares solution of D s = g_S (D the forward
   differences, Neumann boundaries), solved exactly in the DCT basis (:func:`poisson_neumann`);
   its mean is 0, which fixes the global scale A * S leaves free (the scale goes into the albedo);
4. log A = log I - log S, so log A + log S = log I holds to float rounding.

Shading is therefore smooth and grey (one channel); the albedo carries all chromaticity and the
sharp steps. Inputs must be positive: the tokenizer decomposes I + delta (see
:mod:`cartlib.decompose.factors`). Shapes: images (B, 3, H, W).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LUM_EDGE = 0.1  # |d log L| per pixel above which a step is an albedo edge (Horn's threshold)
CHROMA_EDGE = 0.05  # |d log chromaticity| per pixel above which a step is an albedo edge


@dataclass
class Intrinsic:
    """log A (B, 3, H, W) and log S (B, 1, H, W) with log A + log S = log I."""

    log_albedo: torch.Tensor
    log_shading: torch.Tensor

    @property
    def albedo(self) -> torch.Tensor:
        return self.log_albedo.exp()

    @property
    def shading(self) -> torch.Tensor:
        return self.log_shading.exp()

    def reconstruct(self) -> torch.Tensor:
        """I = exp(log A + log S) (the paper's reconstruction by exponentiation)."""
        return (self.log_albedo + self.log_shading).exp()


def dct_matrix(n: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """The orthonormal DCT-II matrix C (n, n): C @ x is the DCT of x, C.T @ y its inverse."""
    k = torch.arange(n, dtype=dtype, device=device)[:, None]
    i = torch.arange(n, dtype=dtype, device=device)[None, :]
    c = torch.cos(math.pi * (i + 0.5) * k / n) * math.sqrt(2 / n)
    c[0] /= math.sqrt(2)
    return c


def forward_differences(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d/dy, d/dx) of (B, C, H, W): shapes (B, C, H-1, W) and (B, C, H, W-1)."""
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def divergence_adjoint(gy: torch.Tensor, gx: torch.Tensor) -> torch.Tensor:
    """D^T g for the forward differences D (the negative divergence). -> (B, C, H, W)"""
    pad = torch.nn.functional.pad
    return pad(gy, (0, 0, 1, 0)) - pad(gy, (0, 0, 0, 1)) + pad(gx, (1, 0)) - pad(gx, (0, 1))


def poisson_neumann(gy: torch.Tensor, gx: torch.Tensor) -> torch.Tensor:
    """The zero-mean s minimising ||D s - (gy, gx)||^2: the normal equations D^T D s = D^T g are a
    Neumann Poisson problem, diagonal in the DCT-II basis with eigenvalues
    (2 - 2 cos(pi i / H)) + (2 - 2 cos(pi j / W)). Solved in float64. -> (B, C, H, W)"""
    rhs = divergence_adjoint(gy.double(), gx.double())
    h, w = rhs.shape[-2:]
    ch, cw = dct_matrix(h, device=rhs.device), dct_matrix(w, device=rhs.device)
    lam_y = 2 - 2 * torch.cos(math.pi * torch.arange(h, dtype=torch.float64) / h)
    lam_x = 2 - 2 * torch.cos(math.pi * torch.arange(w, dtype=torch.float64) / w)
    lam = (lam_y[:, None] + lam_x[None, :]).to(rhs.device)
    lam[0, 0] = 1.0  # the constant mode: its coefficient is set to 0 below (zero mean)
    coef = ch @ rhs @ cw.T / lam
    coef[..., 0, 0] = 0
    return ch.T @ coef @ cw


def retinex_shading(
    log_image: torch.Tensor, lum_edge: float = LUM_EDGE, chroma_edge: float = CHROMA_EDGE
) -> torch.Tensor:
    """log S (B, 1, H, W) of a log image (B, 3, H, W): the integral of its small, colourless
    luminance gradients (steps 1-3 of the module docstring)."""
    lum = log_image.mean(1, keepdim=True)  # (B, 1, H, W)
    chroma = log_image - lum  # (B, 3, H, W)
    gy, gx = forward_differences(lum)
    cy, cx = (d.norm(dim=1, keepdim=True) for d in forward_differences(chroma))
    shading_y = gy * ((gy.abs() <= lum_edge) & (cy <= chroma_edge))
    shading_x = gx * ((gx.abs() <= lum_edge) & (cx <= chroma_edge))
    return poisson_neumann(shading_y, shading_x).to(log_image.dtype)


def intrinsic(
    x: torch.Tensor, lum_edge: float = LUM_EDGE, chroma_edge: float = CHROMA_EDGE
) -> Intrinsic:
    """The Retinex albedo/shading split of positive images x (B, 3, H, W) (module docstring):
    log A + log S = log x exactly (to float rounding), log S smooth, grey and of mean 0."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"x must be (B, 3, H, W), got shape {tuple(x.shape)}")
    if not bool((x > 0).all()):
        raise ValueError(
            f"intrinsic() takes the log of x, so x must be positive (min {x.min().item():.3g}); "
            "decompose x + delta, e.g. x + 0.05 (what the tokenizer does)"
        )
    log_image = x.log()
    log_shading = retinex_shading(log_image, lum_edge, chroma_edge)
    return Intrinsic(log_albedo=log_image - log_shading, log_shading=log_shading)
