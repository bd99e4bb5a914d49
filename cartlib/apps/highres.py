"""Training-free high resolution (paper, "Generalizing to Higher Resolutions", Figure 6, Table 2).

The base carries the global structure and colour, the details local texture (Figure 10), so a model
trained at H x W can make an image s times larger without retraining:

1. generate at the training resolution (or take given base tokens: super-resolution);
2. upscale the **base** features f_B = sum_{k <= B} phi_k(z_k) (Alg. 2 over the base steps) from
   the latent size (h, w) to (s h, s w) (bicubic, VAR's up-sampling);
3. predict the **detail** token maps patch by patch at the target size: every latent window of the
   training size (h, w) is re-tokenized into base token maps r_1..r_B (Alg. 1's base steps on the
   window, :meth:`~cartlib.tokenizer.quantize.ScheduleQuantizer.quantize_base`), fed to the
   transformer as the prefix, and the transformer samples the detail maps r_{B+1}..r_M of that
   window; their terms phi_k(z_k) are placed back;
4. decode f_B (upscaled) + the placed detail terms at (s H, s W): the decoder is convolutional.

Patches: **NOV** tiles the target latent with non-overlapping windows (the paper's CART-256-NOV);
**OV** uses windows at half-window strides (50 % overlap, CART-256-OV) and blends the detail terms
of overlapping windows with a tent window (weights normalised to sum to 1 at every position), so
no window edge is a hard edge. For order 0 (VAR: no details) the same procedure predicts the last,
full-size scale patchwise on top of the upscaled coarser scales: the VAR comparison of Figure 6.

:func:`seam_score` measures visible seams: the mean absolute step across the NOV window borders
divided by the mean step across the other token borders (1 = no seam).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cartlib.sample import generate
from cartlib.tokenizer.vqvae import resize


@dataclass
class HighRes:
    images: torch.Tensor  # (B,3,sH,sW) in [0,1]
    features: torch.Tensor  # (B,C,sh,sw) f_B upscaled + blended detail terms
    detail: torch.Tensor  # (B,C,sh,sw) the blended detail terms alone
    base_tokens: list[torch.Tensor]  # r_1..r_n_ctx at the training size, each (B,h_k,w_k)
    low: torch.Tensor | None  # (B,3,H,W) the training-resolution generation, if one was made
    n_patches: int  # windows per image


def context_steps(schedule) -> int:
    """Steps kept from the training-resolution pass: the base steps (CART), or all but the last,
    full-size scale (order 0, VAR)."""
    return schedule.n_base if schedule.n_factors else schedule.n_base - 1


def window_starts(size: int, window: int, overlap: bool) -> list[int]:
    """Start positions of windows of ``window`` tokens covering ``size``: strides of a window
    (NOV) or half a window (OV, 50 % overlap)."""
    if size % window or (overlap and window % 2):
        raise ValueError(
            f"the target latent size {size} must be a multiple of the window {window} (and the "
            "window even for 50 % overlap): choose an integer scale"
        )
    stride = window // 2 if overlap else window
    return list(range(0, size - window + 1, stride))


def tent(n: int, overlap: bool) -> torch.Tensor:
    """Blending weights along one window side (n,): a tent, positive everywhere (OV), or ones."""
    if not overlap:
        return torch.ones(n)
    i = torch.arange(n, dtype=torch.float32)
    return torch.minimum(i + 0.5, n - i - 0.5) / (n / 2)


@torch.no_grad()
def patch_details(
    model,
    tokenizer,
    f_ctx: torch.Tensor,
    labels: torch.Tensor,
    overlap: bool,
    seed: int = 0,
    batch_size: int = 256,
    **sample_kw,
) -> tuple[torch.Tensor, int]:
    """Step 3 of the module docstring: the blended terms of the steps after the context,
    predicted window by window on the upscaled context features f_ctx (B,C,sh,sw).
    -> (terms (B,C,sh,sw), windows per image)"""
    q, sched = tokenizer.quantizer, model.schedule
    n_ctx = context_steps(sched)
    (h, w), (sh, sw) = sched.full_hw, f_ctx.shape[-2:]
    boxes = [(y, x) for y in window_starts(sh, h, overlap) for x in window_starts(sw, w, overlap)]
    weight = (tent(h, overlap)[:, None] * tent(w, overlap)[None, :]).to(f_ctx)  # (h, w)
    crops = torch.stack([f_ctx[..., y : y + h, x : x + w] for y, x in boxes], 1)  # (B,P,C,h,w)
    crops = crops.flatten(0, 1)  # (B*P, C, h, w), image-major
    crop_labels = labels.to(f_ctx.device).repeat_interleave(len(boxes))
    terms = []
    for i in range(0, len(crops), batch_size):
        prefix = q.quantize_base(crops[i : i + batch_size], n_ctx)
        gen = generate(
            model, tokenizer, crop_labels[i : i + batch_size], prefix=prefix, seed=seed + i,
            **sample_kw,
        )  # fmt: skip
        terms.append(sum(q.step_term(gen.tokens[m], m) for m in range(n_ctx, sched.n_steps)))
    terms = torch.cat(terms).unflatten(0, (len(f_ctx), len(boxes)))  # (B,P,C,h,w)
    out = torch.zeros_like(f_ctx)
    norm = torch.zeros(sh, sw, dtype=f_ctx.dtype, device=f_ctx.device)
    for p, (y, x) in enumerate(boxes):
        out[..., y : y + h, x : x + w] += weight * terms[:, p]
        norm[y : y + h, x : x + w] += weight
    return out / norm, len(boxes)


@torch.no_grad()
def high_resolution(
    model,
    tokenizer,
    labels,
    scale: int = 2,
    overlap: bool = True,
    base_tokens: list[torch.Tensor] | None = None,
    seed: int = 0,
    **sample_kw,
) -> HighRes:
    """Images ``scale`` times the training size without retraining (module docstring).

    ``labels`` (B,) condition both passes (``model.num_classes`` = unconditional). Without
    ``base_tokens`` the training-resolution image is generated first (its base is kept, its
    details dropped); with them (r_1..r_k, k = :func:`context_steps`, e.g. an encoded
    low-resolution photo) that pass is skipped. ``sample_kw`` go to :func:`generate`."""
    device = next(model.parameters()).device
    labels = torch.as_tensor(labels, device=device).long()
    sched, q = model.schedule, tokenizer.quantizer
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale={scale!r} must be a positive integer (2: twice the size)")
    n_ctx = context_steps(sched)
    low = None
    if base_tokens is None:
        gen = generate(model, tokenizer, labels, seed=seed, **sample_kw)
        base_tokens, low = gen.tokens[:n_ctx], gen.images
    if len(base_tokens) != n_ctx:
        raise ValueError(f"base_tokens: need the first {n_ctx} token maps, got {len(base_tokens)}")
    base_tokens = [t.to(device).long() for t in base_tokens]
    h, w = sched.full_hw
    f_ctx = resize(q.features(base_tokens, n_ctx), (scale * h, scale * w))  # Alg. 2, upscaled
    detail, n_patches = patch_details(
        model, tokenizer, f_ctx, labels, overlap, seed=seed + 1, **sample_kw
    )
    f = f_ctx + detail
    return HighRes(tokenizer.decode(f), f, detail, base_tokens, low, n_patches)


def upscale(images: torch.Tensor, scale: int, mode: str = "bilinear") -> torch.Tensor:
    """Plain interpolation of images (B,3,H,W) by ``scale`` (the bilinear/bicubic baselines)."""
    size = (images.shape[-2] * scale, images.shape[-1] * scale)
    kw = {"antialias": False, "align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(images, size=size, mode=mode, **kw).clamp(0, 1)


def seam_score(x: torch.Tensor, period: int, phase: int = 1) -> torch.Tensor:
    """Seam visibility of maps x (B,C,H,W) tiled by windows of ``period`` pixels: the mean |step|
    between neighbours across the window borders (columns and rows k * period) over the mean
    |step| across the other pairs at the same position in a ``phase`` grid (``phase`` = pixels per
    latent token: every token border; interpolation and the decoder's up-sampling make steps
    between tokens differ from steps inside one, so like is compared with like). 1: the window
    borders look like any other token border. -> (B,)"""
    if period % phase or (x.shape[-1] <= period and x.shape[-2] <= period):
        raise ValueError(
            f"period={period} must be a multiple of phase={phase} and smaller than the maps "
            f"{tuple(x.shape[-2:])}"
        )
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean(1)  # (B, H, W-1): step between col j, j+1
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(1)  # (B, H-1, W)

    def kinds(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = torch.arange(n, device=x.device) + 1  # step j-1 -> j
        return j % period == 0, (j % phase == 0) & (j % period != 0)

    bx, ox = kinds(dx.shape[-1])
    by, oy = kinds(dy.shape[-2])
    border = torch.cat([dx[..., bx].flatten(1), dy[:, by].flatten(1)], 1)
    other = torch.cat([dx[..., ox].flatten(1), dy[:, oy].flatten(1)], 1)
    return border.mean(1) / other.mean(1).clamp_min(1e-12)


@dataclass
class Upscaling:
    sample: torch.Tensor  # (B,3,H,W) the training-size generation
    images: dict[str, torch.Tensor]  # method -> (B,3,sH,sW)
    detail_seams: dict[str, torch.Tensor]  # "NOV" / "OV" -> (B,) seam score of the detail terms


@torch.no_grad()
def compare_upscaling(
    model, tokenizer, labels, scale: int = 2, seed: int = 0, **sample_kw
) -> Upscaling:
    """One training-size generation made ``scale`` times larger four ways (Figure 6): bilinear
    interpolation, the upscaled base alone (no details), NOV and OV patchwise details."""
    gen = generate(model, tokenizer, labels, seed=seed, **sample_kw)
    n_ctx = context_steps(model.schedule)
    ctx = gen.tokens[:n_ctx]
    nov = high_resolution(model, tokenizer, labels, scale, False, ctx, seed=seed, **sample_kw)
    ov = high_resolution(model, tokenizer, labels, scale, True, ctx, seed=seed, **sample_kw)
    images = {
        "bilinear": upscale(gen.images, scale, "bilinear"),
        "base only": tokenizer.decode(nov.features - nov.detail),  # f_B upscaled, no details
        "NOV": nov.images,
        "OV": ov.images,
    }
    window = model.schedule.full_hw[0]  # latent tokens: every step is between two tokens
    seams = {"NOV": seam_score(nov.detail, window), "OV": seam_score(ov.detail, window)}
    return Upscaling(gen.images, images, seams)
