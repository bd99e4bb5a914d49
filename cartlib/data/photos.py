"""``photos``: colour, textured crops of the photographs that installed packages ship (offline).

Fashion-MNIST is grey and nearly flat at 32x32: its detail layers hold 0.7 % of the image
variance, so next-detail prediction has almost nothing to show there. This dataset gives the
classroom a colour one whose details carry a visible share (numbers in the README).

Sources (classes = the source photograph, in this order): scikit-image's astronaut, chelsea (a
cat), coffee, rocket, immunohistochemistry, hubble_deep_field, retina and the left view of
stereo_motorcycle, and matplotlib's grace_hopper sample — 9 classes.

Design decisions:

- Each photo is resized (antialiased) so that its short side is ``SCALE`` = 3 x resolution; a crop
  then spans a third of the short side: a part of the scene (a face, a sleeve, a cup's rim), not a
  thumbnail of the whole photo, and one photo yields thousands of distinct crops. Measured on 96
  test crops at 32x32, ||I - B_3||^2 / Var(I) is 1.15 % at SCALE 3 and 0.93 % at SCALE 4 (1.8x and
  1.5x Fashion-MNIST's 0.64 %): zooming in smooths the content, so SCALE is as small as the split
  allows (a square photo's test strip is then exactly one crop wide).
- Split by region: along the photo's long side the last ``TEST_SHARE`` (a third) is the test
  region, the rest the train region, and every crop lies wholly inside its region — no test pixel
  is ever seen in training (tested).
- Crop positions are seeded per (split, photo): ``limit`` keeps the first N items, which interleave
  the photos, so any limit spans all classes evenly.
"""

from __future__ import annotations

import numpy as np
import torch

from cartlib.data.arrays import ArrayDataset, resize_uint8, skimage_photo
from cartlib.data.common import SPLITS

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry",
          "hubble_deep_field", "retina", "motorcycle", "grace_hopper")  # fmt: skip
SCALE = 3  # short side of the resized photo, in crop sizes
TEST_SHARE = 1 / 3  # the last third of each photo's long side is held out
CROPS = {"train": 2048, "test": 256}  # per photo


def _photo(name: str) -> torch.Tensor:
    """(3, H, W) uint8 of a bundled photo."""
    if name == "grace_hopper":
        import matplotlib.cbook  # optional import: only this source needs it
        from PIL import Image

        path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
        with Image.open(path) as im:
            rgb = np.array(im.convert("RGB"))  # a writable copy
        return torch.from_numpy(rgb).permute(2, 0, 1)
    return skimage_photo(name)


def region(shape: tuple[int, int], split: str) -> tuple[slice, slice]:
    """The (rows, cols) of a photo of ``shape`` that belong to ``split`` (split by region)."""
    h, w = shape
    long_axis = 0 if h > w else 1
    cut = round((h, w)[long_axis] * (1 - TEST_SHARE))
    part = slice(0, cut) if split == "train" else slice(cut, (h, w)[long_axis])
    return (part, slice(0, w)) if long_axis == 0 else (slice(0, h), part)


def photo_crops(split, resolution, root, limit, bad_files, download, progress):
    """Seeded ``resolution``-square crops from the train or test region of every photo."""
    per_photo, n_photos = CROPS[split], len(PHOTOS)
    n = per_photo * n_photos if limit is None else min(limit, per_photo * n_photos)
    crops = np.empty((n, 3, resolution, resolution), np.uint8)
    for p, name in enumerate(PHOTOS):
        photo = _photo(name)
        h, w = photo.shape[1:]
        scale = SCALE * resolution / min(h, w)
        size = (round(h * scale), round(w * scale))
        photo = resize_uint8(photo[None], size)[0].contiguous().numpy()
        rows, cols = region(size, split)
        part = photo[:, rows, cols]
        rng = np.random.default_rng([7, SPLITS.index(split), p])
        tops = rng.integers(0, part.shape[1] - resolution + 1, per_photo)
        lefts = rng.integers(0, part.shape[2] - resolution + 1, per_photo)
        for i in range(p, n, n_photos):  # item i = crop i // n_photos of photo i % n_photos
            t, left = tops[i // n_photos], lefts[i // n_photos]
            crops[i] = part[:, t : t + resolution, left : left + resolution]
    labels = [i % n_photos for i in range(n)]
    source = "scikit-image and matplotlib sample photos"
    return ArrayDataset(
        "photos", split, torch.from_numpy(crops), labels, PHOTOS, resolution, source
    )
