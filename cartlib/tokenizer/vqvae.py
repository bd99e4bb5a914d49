"""Convolutional VQ-VAE encoder/decoder (VQGAN-style, small enough for a CPU at smoke scale).

The encoder maps images in [0,1] (B,3,H,W) to features f = E(I) (B,C,h,w) with
h = H / 2**(len(ch_mult)-1); the decoder maps a (quantized) feature map back to images. The
quantizer between them lives in ``quantize.py`` and is driven by the TokenSchedule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, ch // 4) if ch >= 8 else 1, ch, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.block = nn.Sequential(
            _norm(c_in),
            nn.SiLU(),
            nn.Conv2d(c_in, c_out, 3, padding=1),
            _norm(c_out),
            nn.SiLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1),
        )
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.block(x)


class Encoder(nn.Module):
    """(B,3,H,W) in [0,1] -> (B,C,H/s,W/s), s = 2**(len(ch_mult)-1)."""

    def __init__(self, channels: int, ch_mult: tuple[int, ...], latent_channels: int, n_res=1):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 3, padding=1)]
        c = channels
        for i, mult in enumerate(ch_mult):
            for _ in range(n_res):
                layers.append(ResBlock(c, channels * mult))
                c = channels * mult
            if i < len(ch_mult) - 1:
                layers.append(nn.Conv2d(c, c, 4, stride=2, padding=1))  # 2x down
        layers += [ResBlock(c, c), _norm(c), nn.SiLU(), nn.Conv2d(c, latent_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images * 2 - 1)


class Decoder(nn.Module):
    """(B,C,h,w) -> (B,3,h*s,w*s); images come out in [0,1] up to the model's error."""

    def __init__(self, channels: int, ch_mult: tuple[int, ...], latent_channels: int, n_res=1):
        super().__init__()
        c = channels * ch_mult[-1]
        layers: list[nn.Module] = [nn.Conv2d(latent_channels, c, 3, padding=1), ResBlock(c, c)]
        for i, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(n_res):
                layers.append(ResBlock(c, channels * mult))
                c = channels * mult
            if i > 0:
                layers += [
                    nn.Upsample(scale_factor=2, mode="nearest"),
                    nn.Conv2d(c, c, 3, padding=1),
                ]
        layers += [_norm(c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return (self.net(f) + 1) / 2


def downsample_factor(ch_mult: tuple[int, ...]) -> int:
    return 2 ** (len(ch_mult) - 1)


def resize(x: torch.Tensor, hw: tuple[int, int], up_mode: str = "bicubic") -> torch.Tensor:
    """Area-downsample or ``up_mode``-upsample a (B,C,h,w) map to ``hw`` (VAR's choices)."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    if hw[0] <= x.shape[-2] and hw[1] <= x.shape[-1]:
        return F.interpolate(x, size=hw, mode="area")
    return F.interpolate(x, size=hw, mode=up_mode)
