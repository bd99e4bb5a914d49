"""VAR's image augmentation, as per-item requests that a sampler draws and a worker applies.

Training (VAR, ``utils/data.py``): the shorter side is resized to ``mid_ratio x resolution``
(``mid_reso`` = 1.125), an R x R square is cropped at a random position, and the image is
optionally mirrored. Evaluation: the same resize, then the centre crop. ``mid_ratio = 1`` with the
centre crop is the plain "centre square, resized" of :func:`cartlib.data.load_image`.

Design decisions:

- **The randomness is drawn where the batch is chosen, not in the worker.** A :class:`Crop`
  request says which item, where to crop (fractions of the free margin, or the centre) and whether
  to mirror; the sampler draws them from (seed, step), so the batch of a step, augmentation
  included, is a pure function of (seed, step) whatever the number of DataLoader workers or
  processes (exact resume, and 1 vs 2 processes see the same global batch).
- **One resampling.** Files are cut to the whole source pixels around the crop's source box,
  and the box is resized to R x R (bilinear, antialiased, PIL ``resize(box=)``): VAR's
  resize-then-crop geometry, but only the crop is resampled and no pixel outside it bleeds into
  its border (a centre square is exactly the old "crop, then resize"). JPEGs are decoded at a
  reduced DCT scale (``draft``) that keeps the short side >= ``mid_ratio x resolution``.
- Tensors (the in-memory datasets, already at R x R) are resized with torch's antialiased
  bilinear kernel, the same filter.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class Crop(NamedTuple):
    """One item request: item ``index``; crop offsets as fractions in [0, 1) of the free margin
    (``None``: the centre); ``flip``: mirror horizontally."""

    index: int
    top: float | None = None
    left: float | None = None
    flip: bool = False


def centre(index: int, flip: bool = False) -> Crop:
    return Crop(int(index), None, None, flip)


def mid_size(resolution: int, mid_ratio: float) -> int:
    """The shorter side before cropping: ``round(mid_ratio x resolution)``, at least R."""
    return max(resolution, round(mid_ratio * resolution))


def _offset(frac: float | None, margin: int) -> int:
    """Pixel offset of a crop: the centre (torchvision's rounding) or uniform in [0, margin]."""
    if frac is None:
        return int(round(margin / 2))
    return min(margin, math.floor(frac * (margin + 1)))


def _scaled(w: int, h: int, short: int) -> tuple[int, int]:
    """(W', H') of an image w x h whose shorter side is resized to ``short``."""
    scale = short / min(w, h)
    return max(short, round(w * scale)), max(short, round(h * scale))


def crop_pil(im: Image.Image, resolution: int, mid_ratio: float, req: Crop) -> np.ndarray:
    """Resize ``im`` (RGB) so its shorter side is ``mid_size``, crop R x R as ``req`` says, mirror
    if asked; one antialiased bilinear resampling from the source box. -> uint8 (R, R, 3)."""
    w, h = im.size
    ws, hs = _scaled(w, h, mid_size(resolution, mid_ratio))
    top, left = _offset(req.top, hs - resolution), _offset(req.left, ws - resolution)
    sx, sy = ws / w, hs / h  # the crop of the resized W' x H' image, in source pixels
    box = (left / sx, top / sy, (left + resolution) / sx, (top + resolution) / sy)
    hull = (math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]), math.ceil(box[3]))
    inner = (box[0] - hull[0], box[1] - hull[1], box[2] - hull[0], box[3] - hull[1])
    out = im.crop(hull).resize((resolution, resolution), Image.Resampling.BILINEAR, box=inner)
    if req.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out)


def crop_tensor(x: torch.Tensor, resolution: int, mid_ratio: float, req: Crop) -> torch.Tensor:
    """The same transform for a uint8 image (C, h, w). -> uint8 (C, R, R)."""
    h, w = x.shape[-2:]
    ws, hs = _scaled(w, h, mid_size(resolution, mid_ratio))
    if (hs, ws) != (h, w):
        x = F.interpolate(x[None], size=(hs, ws), mode="bilinear", antialias=True)[0]
    top, left = _offset(req.top, hs - resolution), _offset(req.left, ws - resolution)
    x = x[:, top : top + resolution, left : left + resolution]
    return x.flip(-1) if req.flip else x


def draw(
    indices: torch.Tensor, generator: torch.Generator, random_crop: bool, hflip: bool
) -> list[Crop]:
    """Requests for ``indices`` (B,): random crop offsets and mirroring drawn from ``generator``
    (always the same three draws, so switching one setting never shifts another's numbers)."""
    u = torch.rand(len(indices), 3, generator=generator, dtype=torch.float64).tolist()
    return [
        Crop(int(i), a if random_crop else None, b if random_crop else None, hflip and c < 0.5)
        for i, (a, b, c) in zip(indices.tolist(), u, strict=True)
    ]


def view(
    index: int, v: int, seed: int, random_crop: bool = False, hflip: bool = False
) -> Crop:  # fmt: skip
    """View ``v`` of an image for token extraction (the transformer's training data).

    ``random_crop`` (VAR's augmentation, the full-scale presets): every view a random crop drawn
    from (seed, index, v), mirrored (half of them) only with ``hflip`` — K views are K of the
    crops VAR draws afresh each step. Otherwise (small presets): 0 the centre crop, 1 its mirror
    (LlamaGen's two flips), v >= 2 a random crop, mirrored or not."""
    if not random_crop and v < 2:
        return centre(index, flip=v == 1)
    g = torch.Generator().manual_seed(hash_seed(seed, index, v))
    a, b, c = torch.rand(3, generator=g, dtype=torch.float64).tolist()
    return Crop(int(index), a, b, c < 0.5 if (hflip or not random_crop) else False)


CENTRE_MIRROR_CROPS = "centre, mirror, random crops"  # what view() gives without random_crop


def views_are(random_crop: bool, hflip: bool) -> str:
    """What :func:`view` makes the extracted views (recorded in token shards, so shards of
    another rule are not reused)."""
    if random_crop:
        return "random crops, half mirrored" if hflip else "random crops"
    return CENTRE_MIRROR_CROPS


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python runs)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h >> 1
