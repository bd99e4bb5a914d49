"""Super-resolution by token prefix (paper, "Super-Resolution", Table 3, Figure 7).

A low-resolution (LR) image of h x w pixels is encoded into the base token maps r_1..r_k whose size
is at most its own latent size (h/p x w/p, p the tokenizer's down-sampling): here by encoding the
LR image bicubically resized to the training size (Alg. 1) and keeping those first k maps, so
they hold what the LR image knows and nothing finer. They are the prefix of an **unconditional**
generation (the null class): the transformer predicts r_{k+1}..r_M — the finer base scales and
every detail — and the decoder renders the training size. A target beyond the training size uses
the training-free high-resolution strategy on top (:mod:`cartlib.apps.highres`): the base of the
training-size result is upscaled and the details are predicted patchwise.

The paper scores PSNR / SSIM and CLIP-IQA against ResShift, Real-ESRGAN and SinSR (Table 3);
cartlib reports PSNR / SSIM / LPIPS against bicubic interpolation (:func:`sr_report`). CLIP-IQA
needs CLIP weights that no offline machine here has.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cartlib.apps.highres import context_steps, high_resolution
from cartlib.metrics import psnr, ssim
from cartlib.sample import generate


@dataclass
class SuperRes:
    images: torch.Tensor  # (B,3,T,T) the super-resolved images in [0,1]
    prefix: list[torch.Tensor]  # r_1..r_k taken from the LR image
    tokens: list[torch.Tensor]  # r_1..r_M of the training-size pass (prefix first)
    n_prefix: int  # k


def resize_images(x: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    """Square resize of images (B,3,H,W) in [0,1]: antialiased when shrinking, clamped."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    shrink = size < x.shape[-1]
    return F.interpolate(x, size=(size, size), mode=mode, antialias=shrink).clamp(0, 1)


def prefix_steps(schedule, lr_latent: int) -> int:
    """k: the number of leading base steps no larger than the LR image's latent size."""
    k = 0
    for step in schedule.steps[: schedule.n_base]:
        if max(step.h, step.w) > lr_latent:
            break
        k += 1
    if k == 0:
        raise ValueError(
            f"an LR image of latent size {lr_latent} is smaller than the first token map "
            f"({schedule[0].h}x{schedule[0].w}); use a larger LR image"
        )
    return k


@torch.no_grad()
def lr_prefix(tokenizer, lr: torch.Tensor) -> list[torch.Tensor]:
    """r_1..r_k of an LR image batch (B,3,h,h) in [0,1] (module docstring)."""
    res, sched = tokenizer.resolution, tokenizer.schedule
    down = res // sched.full_hw[0]
    if lr.shape[-1] % down or lr.shape[-1] > res:
        raise ValueError(
            f"LR size {lr.shape[-1]} must be a multiple of the tokenizer's down-sampling {down} "
            f"and at most its training size {res}"
        )
    device = next(tokenizer.parameters()).device
    tokens = tokenizer.encode(resize_images(lr, res).to(device))
    return tokens[: prefix_steps(sched, lr.shape[-1] // down)]


@torch.no_grad()
def super_resolve(
    model, tokenizer, lr: torch.Tensor, target: int, overlap: bool = True, seed: int = 0, **kw
) -> SuperRes:
    """Super-resolve LR images (B,3,h,h) to ``target`` pixels (a multiple of the training size,
    or the training size itself), unconditionally; ``kw`` go to :func:`generate` (e.g. ``cfg=0``,
    ``top_k``)."""
    res = tokenizer.resolution
    if target <= lr.shape[-1] or (target > res and target % res):
        raise ValueError(
            f"target={target} must exceed the LR size {lr.shape[-1]} and be the training size "
            f"{res} or a multiple of it"
        )
    null = torch.full((len(lr),), model.num_classes)
    prefix = lr_prefix(tokenizer, lr)
    gen = generate(model, tokenizer, null, prefix=prefix, seed=seed, **kw)
    images = gen.images
    if target > res:
        n_ctx = context_steps(model.schedule)
        hr = high_resolution(
            model, tokenizer, null, target // res, overlap, gen.tokens[:n_ctx], seed=seed, **kw
        )
        images = hr.images
    return SuperRes(images, prefix, gen.tokens, len(prefix))


@torch.no_grad()
def sr_report(sr: torch.Tensor, hr: torch.Tensor, perceptual=None) -> dict[str, float]:
    """Mean PSNR (dB), SSIM and, with a ``perceptual`` distance (cartlib.perceptual), LPIPS of
    super-resolved images against the ground truth, both (B,3,T,T) in [0,1]."""
    sr, hr = sr.float().cpu().clamp(0, 1), hr.float().cpu()
    out = {"psnr": float(psnr(sr, hr).mean()), "ssim": float(ssim(sr, hr).mean())}
    if perceptual is not None:
        dev = next(perceptual.parameters()).device
        out["lpips"] = float(perceptual(sr.to(dev), hr.to(dev)).mean())
    return out
