"""A synthetic image folder for tests and benchmarks: small images of mixed sizes, modes and
formats in ImageFolder layout, so the full-scale data path runs on a CPU without ImageNet.

``make_image_folder(root, images=1000, val_images=100)`` writes ``root/train/class_00/...`` (and
``root/val/...``): piecewise-smooth pictures (a gradient and a few flat shapes, which give the
decomposition real edges), with sizes drawn between ``sizes``, every fifth file in each of RGB
JPEG, greyscale JPEG, RGBA PNG, palette PNG and RGB PNG. Deterministic in ``seed``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

KINDS = (("RGB", "jpg"), ("L", "jpg"), ("RGBA", "png"), ("P", "png"), ("RGB", "png"))


def _picture(rng: np.random.Generator, h: int, w: int, tint: np.ndarray) -> np.ndarray:
    """uint8 (h, w, 3): a tinted gradient with 2-4 flat rectangles and ellipses on top."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = (yy / h * rng.uniform(-1, 1) + xx / w * rng.uniform(-1, 1))[..., None]
    img = np.clip(tint + 60 * ramp, 0, 255)
    for _ in range(rng.integers(2, 5)):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.1, 0.4) * h, rng.uniform(0.1, 0.4) * w
        if rng.random() < 0.5:
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            mask = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
        img[mask] = rng.integers(0, 256, 3)
    img += rng.normal(0, 4, img.shape)  # a little texture
    return np.clip(img, 0, 255).astype(np.uint8)


def make_image_folder(
    root: str | Path,
    images: int = 1000,
    val_images: int = 0,
    classes: int = 4,
    sizes: tuple[int, int] = (24, 80),
    seed: int = 0,
) -> Path:
    """Write ``images`` training (and ``val_images`` validation) pictures under ``root`` in
    ImageFolder layout, ``classes`` class folders, side lengths in ``sizes``. Returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    tints = rng.integers(40, 216, (classes, 3)).astype(np.float32)  # a colour cast per class
    for split, n in (("train", images), ("val", val_images)):
        for c in range(classes):
            (root / split / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            c = i % classes
            h, w = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
            mode, ext = KINDS[i % len(KINDS)]
            im = Image.fromarray(_picture(rng, h, w, tints[c]))
            if mode == "RGBA":
                im.putalpha(Image.fromarray(rng.integers(128, 256, (h, w), dtype=np.uint8)))
            elif mode == "P":
                im = im.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
            elif mode == "L":
                im = im.convert("L")
            im.save(root / split / f"class_{c:02d}" / f"{split}_{i:06d}.{ext}", quality=90)
    return root
