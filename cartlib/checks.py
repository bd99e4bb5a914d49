"""Input checks shared by every layer (ground floor: imports nothing of cartlib)."""

from __future__ import annotations

import torch


def check_images(x, name: str = "images", channels: int | None = None, atol: float = 1e-4):
    """Return ``x`` if it is a float (B, C, H, W) tensor of finite values in [0, 1] (give or take
    ``atol`` of float rounding), else raise a ValueError naming ``name``, the problem and the
    fix."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor (B, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        fix = "; add the batch dimension with x.unsqueeze(0)" if x.dim() == 3 else ""
        raise ValueError(f"{name} must be 4-D (B, C, H, W), got shape {tuple(x.shape)}{fix}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); pass at least one image")
    if not x.is_floating_point():
        raise ValueError(f"{name} has dtype {x.dtype}; pass floats in [0, 1], e.g. x.float() / 255")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf values; check the step that produced it")
    lo, hi = (v.item() for v in torch.aminmax(x))
    if lo < -atol or hi > 1 + atol:
        if lo >= -atol and 2 < hi <= 255:
            fix = "it looks like 0-255 data: divide by 255"
        elif lo >= -1 - atol and hi <= 1 + atol:
            fix = "it looks like [-1, 1] data: use (x + 1) / 2"
        else:
            fix = "rescale or clamp it to [0, 1]"
        raise ValueError(f"{name} must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; {fix}")
    return x
