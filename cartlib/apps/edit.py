"""Editing through tokens: recolouring (Figure 8), lighting control (Figure 9) and inpainting.

* **Recolouring** (intrinsic tokenizer, :mod:`cartlib.decompose.intrinsic`): the base token maps
  hold the log albedo, the detail maps the log shading. :func:`intrinsic_factors` decodes both from
  an image's own token maps (Alg. 2 over the base steps: log A; the detail steps' addition: log S).
  :func:`recolour` rotates the hue of that albedo (in YIQ, which keeps luminance) and recomposes
  I' = exp(log A' + log S): the light CART generated on the surfaces is kept exactly, their colour
  changes. :func:`recolour_tokens` goes through tokens instead: it re-tokenizes the turned albedo
  (Alg. 1's base steps, ``quantize_base``) and keeps every shading token, giving new token maps —
  but only colours the codebook can express survive the quantization (at tiny scale, trained on a
  few photos, a turned hue falls back to the photos' own: docs/results.md). ``region``
  restricts either edit to a pixel mask (recolouring one object).
* **Lighting control** (specular tokenizer, :mod:`cartlib.decompose.specular`): decoding the base
  steps gives the diffuse base A_n; each group of detail steps adds one specular factor,
  E_n first. :func:`relight` adds ``level`` of them, the last one scaled by a continuous
  ``gain`` (beyond the paper, which varies the count only).
* **Inpainting** (any tokenizer, beyond the paper): :func:`inpaint` regenerates a masked region
  while every token outside it is forced to the original image's token at every step, in CART's
  order — the base scales first, then the details — so each new token is predicted in the context
  of the kept ones (VAR's zero-shot editing, done next-detail). A full-size token is regenerated
  when its footprint touches the region; a coarser one only when every full-size token under it
  is (coarse maps straddling the border are kept, so the region inherits the coarse layout around
  it). The result is composited: outside the mask
  the output *is* the original's reconstruction; the decoded generation's change there (the
  decoder's receptive field) is reported as leakage. With another class label this is
  class-conditional editing of a region.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cartlib.decompose.factors import LOG_OFFSET, log_denormalise, log_normalise
from cartlib.sample import generate

_RGB_TO_YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]]
)


def factor_configs(cfg, shading_steps: int = 2, specular_order: int = 4, lighting_depth: int = 1):
    """Notebook 09's two CARTs for the run ``cfg`` (its preset and dataset): ``{"intrinsic":
    log albedo scales then ``shading_steps`` shading maps, "specular": the diffuse base then
    ``specular_order`` factors of ``lighting_depth`` maps each}``. cartlib ships both at 09's
    defaults (smoke, photos: ``python -m cartlib ship --preset smoke --dataset photos --for
    09``); the defaults here are 09's."""
    return {
        "intrinsic": cfg.updated(
            decompose={"kind": "intrinsic", "order": 1},
            tokenizer={"depth_per_factor": shading_steps},
        ),
        "specular": cfg.updated(
            decompose={"kind": "specular", "order": specular_order},
            tokenizer={"depth_per_factor": lighting_depth},
        ),
    }


def hue_rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate the hue of colours x (B,3,H,W) by ``degrees`` about the luminance axis (YIQ): the
    luminance Y is kept, the chroma (I, Q) turned. Not clamped."""
    t = math.radians(degrees)
    rot = torch.tensor(
        [[1.0, 0.0, 0.0], [0.0, math.cos(t), -math.sin(t)], [0.0, math.sin(t), math.cos(t)]]
    )
    m = (torch.linalg.inv(_RGB_TO_YIQ) @ rot @ _RGB_TO_YIQ).to(x)
    return torch.einsum("ij,bjhw->bihw", m, x)


def yiq_hue(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hue angle in radians, chroma magnitude) of colours x (B,3,H,W), each (B,H,W)."""
    yiq = torch.einsum("ij,bjhw->bihw", _RGB_TO_YIQ.to(x), x)
    return torch.atan2(yiq[:, 2], yiq[:, 1]), yiq[:, 1:].norm(dim=1)


def hue_shift(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Chroma-weighted circular mean of the hue change from ``before`` to ``after`` (B,3,H,W),
    in degrees, per image (B,)."""
    h0, c0 = yiq_hue(before)
    h1, c1 = yiq_hue(after)
    w = (c0 * c1).flatten(1)
    d = (h1 - h0).flatten(1)
    return torch.rad2deg(torch.atan2((w * d.sin()).sum(1), (w * d.cos()).sum(1)))


def _require(tokenizer, kind: str) -> None:
    if tokenizer.factors.kind != kind or tokenizer.order == 0:
        raise ValueError(
            f"this edit needs a tokenizer trained with decompose.kind={kind!r}, got "
            f"kind={tokenizer.factors.kind!r} at order {tokenizer.order}"
        )


# ---------------------------------------------------------------------------------- recolouring
@torch.no_grad()
def intrinsic_factors(tokenizer, tokens: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log A (B,3,H,W), log S (B,3,H,W)) as an intrinsic CART decodes them from its token maps:
    log A from the base steps alone, log S = what the detail steps add, so that
    exp(log A + log S) - delta is exactly ``tokenizer.decode`` of all steps. Logs of I + delta."""
    log_a = _log_albedo(tokenizer, tokens)
    x_i = tokenizer.decode_features(tokenizer.features(tokens)).clamp(0, 1)
    return log_a, log_denormalise(x_i.float()) - log_a


def _log_albedo(tokenizer, tokens: list[torch.Tensor]) -> torch.Tensor:
    """log A: the decode of the base steps alone, in the log domain. (B,3,H,W)"""
    _require(tokenizer, "intrinsic")
    f_a = tokenizer.features(tokens, tokenizer.schedule.n_base)
    return log_denormalise(tokenizer.decode_features(f_a).clamp(0, 1).float())


@torch.no_grad()
def albedo(tokenizer, tokens: list[torch.Tensor]) -> torch.Tensor:
    """The decoded albedo of intrinsic token maps: exp(log A) of the base steps. (B,3,H,W)"""
    return _log_albedo(tokenizer, tokens).exp()  # albedo of I + delta, >= delta


def _turn(a: torch.Tensor, degrees: float, region: torch.Tensor | None) -> torch.Tensor:
    turned = hue_rotate(a, degrees).clamp_min(LOG_OFFSET / 4)  # log needs positive albedo
    if region is None:
        return turned
    if region.shape[-2:] != a.shape[-2:] or region.shape[1] != 1:
        raise ValueError(f"region {tuple(region.shape)} must be (B,1,H,W) like the images")
    return torch.where(region.to(a.device).bool(), turned, a)


@torch.no_grad()
def recolour(
    tokenizer, tokens: list[torch.Tensor], degrees: float, region: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotate the hue of the albedo that intrinsic token maps decode to by ``degrees`` (inside
    the pixel mask ``region`` (B,1,H,W) if given) and recompose with their own shading:
    exp(log A' + log S) - delta, in [0, 1]. At 0 degrees: the tokens' reconstruction. (B,3,H,W)"""
    log_a, log_s = intrinsic_factors(tokenizer, tokens)
    turned = _turn(log_a.exp(), degrees, region)
    return ((turned.log() + log_s).exp() - LOG_OFFSET).clamp(0, 1)


@torch.no_grad()
def recolour_tokens(
    tokenizer, tokens: list[torch.Tensor], degrees: float, region: torch.Tensor | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The token route (module docstring): re-tokenize the turned albedo, keep the shading
    tokens. -> (images, new token maps)"""
    q, n_base = tokenizer.quantizer, tokenizer.schedule.n_base
    turned = _turn(albedo(tokenizer, tokens), degrees, region)
    f_a = tokenizer.encode_features(log_normalise(turned.log()))  # Eq. 7 on the edited albedo
    new = q.quantize_base(f_a) + [t.long() for t in tokens[n_base:]]  # Alg. 1 base, shading kept
    return tokenizer.decode(tokenizer.features(new)), new


# ------------------------------------------------------------------------------------- lighting
@torch.no_grad()
def relight(tokenizer, tokens: list[torch.Tensor], level: float, gain: float = 1.0) -> torch.Tensor:
    """The diffuse base plus ``level`` specular factors (E_n first), a fractional level adding
    part of the next one; ``gain`` scales all added specular terms. -> (B,3,H,W)"""
    _require(tokenizer, "specular")
    sched = tokenizer.schedule
    n, d, n_base = sched.n_factors, sched.depth_per_factor, sched.n_base
    if not 0 <= level <= n:
        raise ValueError(f"level={level} must lie between 0 (diffuse base) and {n} (all factors)")
    sums = list(tokenizer.quantizer.accumulate(tokens))  # f_hat after every step
    f_base = sums[n_base - 1]
    whole, part = int(level), level - int(level)
    f_lvl = sums[n_base - 1 + whole * d]
    if part > 0:
        f_lvl = f_lvl + part * (sums[n_base - 1 + (whole + 1) * d] - f_lvl)
    return tokenizer.decode(f_base + gain * (f_lvl - f_base))


@torch.no_grad()
def lighting_series(tokenizer, tokens: list[torch.Tensor], gain: float = 1.0) -> torch.Tensor:
    """Figure 9's rows: the diffuse base, then each specular factor added. -> (n+1,B,3,H,W)"""
    n = tokenizer.schedule.n_factors
    return torch.stack([relight(tokenizer, tokens, k, gain) for k in range(n + 1)])


# ------------------------------------------------------------------------------------ inpainting
@dataclass
class Inpainting:
    images: torch.Tensor  # (B,3,H,W): generation inside the region, reconstruction outside
    generated: torch.Tensor  # (B,3,H,W) the decoded generation, not composited
    reconstruction: torch.Tensor  # (B,3,H,W) the original's reconstruction D(f_hat(tokens))
    tokens: list[torch.Tensor]  # r_1..r_M of the result
    original: list[torch.Tensor]  # r_1..r_M of the original image
    keep: list[torch.Tensor]  # (B,h_m,w_m) True where the token was forced to the original's
    leakage: float  # mean |generated - reconstruction| outside the region


def keep_masks(region: torch.Tensor, schedule, down: int) -> list[torch.Tensor]:
    """Per step, True where a token is kept (module docstring): at the full latent size where its
    footprint misses the region, coarser where any full-size token under it is kept.
    region (B,1,H,W) bool (True = regenerate) -> [(B,h_m,w_m) bool]"""
    kept = 1 - F.max_pool2d(region.float(), down)  # (B,1,h,w): 1 = footprint misses the region
    return [F.adaptive_max_pool2d(kept, (s.h, s.w))[:, 0] > 0 for s in schedule]


@torch.no_grad()
def inpaint(
    model, tokenizer, images: torch.Tensor, region: torch.Tensor, labels=None, seed: int = 0, **kw
) -> Inpainting:
    """Regenerate ``region`` (B,1,H,W) bool of ``images`` (B,3,H,W) (module docstring) for
    ``labels`` (default: the null class, unconditional); ``kw`` go to :func:`generate`."""
    device = next(model.parameters()).device
    images, region = images.to(device), region.to(device).bool()
    if region.shape[-2:] != images.shape[-2:] or region.shape[1] != 1:
        raise ValueError(f"region {tuple(region.shape)} must be (B,1,H,W) like the images")
    labels = torch.full((len(images),), model.num_classes) if labels is None else labels
    down = tokenizer.resolution // tokenizer.schedule.full_hw[0]
    original = tokenizer.encode(images)
    recon = tokenizer.decode(tokenizer.features(original))
    keep = keep_masks(region, model.schedule, down)
    gen = generate(model, tokenizer, labels, seed=seed, forced=original, forced_mask=keep, **kw)
    out = torch.where(region, gen.images, recon)
    outside = (~region).expand_as(recon)
    leak = (gen.images - recon).abs()[outside].mean() if outside.any() else torch.tensor(0.0)
    return Inpainting(out, gen.images, recon, gen.tokens, original, keep, float(leak))
