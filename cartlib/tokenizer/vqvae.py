"""Convolutional VQ-VAE encoders/decoders, in two architectures (``TokenizerConfig.arch``).

The encoder maps images in [0,1] (B,3,H,W) to features f = E(I) (B,C,h,w) with
h = H / 2**(len(ch_mult)-1); the decoder maps a (quantized) feature map back to images. The
quantizer between them lives in ``quantize.py`` and is driven by the TokenSchedule.

* ``cartlib`` (:class:`Encoder`, :class:`Decoder`): one residual block per level, no attention,
  small enough for a CPU at smoke scale.
* ``var`` (:class:`VarEncoder`, :class:`VarDecoder`): VAR's VQ-VAE (Tian et al. 2024, its
  ``models/basic_vae.py``, itself latent-diffusion's vq-f16 shape): two residual blocks per level
  in the encoder and three in the decoder, single-head self-attention after every block of the
  lowest-resolution level and between the two middle blocks, GroupNorm(32), 2x down by a
  stride-2 3x3 conv after right/bottom zero padding, 2x up by nearest + 3x3 conv. Its modules
  carry VAR's names (``conv_in``, ``down.{i}.block.{j}.norm1`` ...), so VAR's released
  ``vae_ch160v4096z32.pth`` loads by name (``Tokenizer.load_var_state_dict``). With channels
  160 and ch_mult (1, 1, 2, 2, 4) it has VAR's 109M parameters (with the quantizer).
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


# ------------------------------------------------------------------------- VAR's architecture
VAR_RES_BLOCKS = 2  # residual blocks per encoder level (the decoder has one more), VAR/vq-f16


def _gn(ch: int) -> nn.GroupNorm:
    if ch % 32:
        raise ValueError(f"arch='var' uses GroupNorm(32): channels {ch} must be a multiple of 32")
    return nn.GroupNorm(32, ch, eps=1e-6)


class VarResBlock(nn.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus the (1x1 ``nin_shortcut``) input."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _gn(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _gn(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.nin_shortcut(x) + self.conv2(F.silu(self.norm2(h)))


class VarAttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, 1x1 convs for qkv and output."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _gn(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, 3, 1, c, h * w).transpose(-2, -1).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, hw, C), scale C^-1/2
        return x + self.proj_out(out.transpose(-2, -1).reshape(b, c, h, w))


class _Conv(nn.Module):
    """A ``conv`` child, as VAR names its resampling layers (``downsample.conv``)."""

    def __init__(self, ch: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=stride, padding=0 if stride == 2 else 1)


class VarDown(_Conv):
    def __init__(self, ch: int):
        super().__init__(ch, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # 2x down, right/bottom zero padding


class VarUp(_Conv):
    def __init__(self, ch: int):
        super().__init__(ch, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _level(blocks: list[nn.Module], attn: list[nn.Module], resample: nn.Module | None, name: str):
    """One resolution level: ``block`` and ``attn`` lists, then ``name`` (down/upsample)."""
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(blocks), nn.ModuleList(attn)
    if resample is not None:
        level.add_module(name, resample)
    return level


def _middle(ch: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = (
        VarResBlock(ch, ch),
        VarAttnBlock(ch),
        VarResBlock(ch, ch),
    )
    return mid


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for j, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[j](h)
    return h


def _run_middle(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class VarEncoder(nn.Module):
    """VAR's encoder: (B,3,H,W) in [0,1] -> (B,C,H/s,W/s), s = 2**(len(ch_mult)-1)."""

    def __init__(self, channels: int, ch_mult: tuple[int, ...], latent_channels: int):
        super().__init__()
        n = len(ch_mult)
        self.conv_in = nn.Conv2d(3, channels, 3, padding=1)
        self.down = nn.ModuleList()
        c = channels
        for i, mult in enumerate(ch_mult):
            blocks = []
            for _ in range(VAR_RES_BLOCKS):
                blocks.append(VarResBlock(c, channels * mult))
                c = channels * mult
            attn = [VarAttnBlock(c) for _ in blocks] if i == n - 1 else []
            self.down.append(_level(blocks, attn, VarDown(c) if i < n - 1 else None, "downsample"))
        self.mid = _middle(c)
        self.norm_out, self.conv_out = _gn(c), nn.Conv2d(c, latent_channels, 3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(images * 2 - 1)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(_run_middle(self.mid, h))))


class VarDecoder(nn.Module):
    """VAR's decoder: (B,C,h,w) -> (B,3,h*s,w*s) in [0,1] up to the model's error. ``up[i]`` is
    resolution level i (run from the last to the first, as VAR stores them)."""

    def __init__(self, channels: int, ch_mult: tuple[int, ...], latent_channels: int):
        super().__init__()
        n = len(ch_mult)
        c = channels * ch_mult[-1]
        self.conv_in = nn.Conv2d(latent_channels, c, 3, padding=1)
        self.mid = _middle(c)
        levels = []
        for i in reversed(range(n)):
            blocks = []
            for _ in range(VAR_RES_BLOCKS + 1):
                blocks.append(VarResBlock(c, channels * ch_mult[i]))
                c = channels * ch_mult[i]
            attn = [VarAttnBlock(c) for _ in blocks] if i == n - 1 else []
            levels.insert(0, _level(blocks, attn, VarUp(c) if i > 0 else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out, self.conv_out = _gn(c), nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        h = _run_middle(self.mid, self.conv_in(f))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return (self.conv_out(F.silu(self.norm_out(h))) + 1) / 2


ARCHS = {"cartlib": (Encoder, Decoder), "var": (VarEncoder, VarDecoder)}


def downsample_factor(ch_mult: tuple[int, ...]) -> int:
    return 2 ** (len(ch_mult) - 1)


def resize(x: torch.Tensor, hw: tuple[int, int], up_mode: str = "bicubic") -> torch.Tensor:
    """Area-downsample or ``up_mode``-upsample a (B,C,h,w) map to ``hw`` (VAR's choices)."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    if hw[0] <= x.shape[-2] and hw[1] <= x.shape[-1]:
        return F.interpolate(x, size=hw, mode="area")
    return F.interpolate(x, size=hw, mode=up_mode)
