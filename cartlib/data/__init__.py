"""Datasets: one registry of named image datasets, all yielding ``(image, label)`` with the image a
float32 tensor in [0, 1] of shape (3, resolution, resolution) — step 1 of the data flow.

Registry (:data:`DATASETS`, name -> builder; in-memory ones in ``arrays.py``, files in
``folder.py``):

- ``fashion-mnist`` (default): the gzip'd idx files, read with numpy, from ``root``, then
  ``$CART_DATA_DIR`` (the folder, its ``fashion-mnist/`` or ``FashionMNIST/raw/``), Debian's
  ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist), torchvision's copy in the cache,
  and last a torchvision download when online. Grey is replicated to 3 channels.
- ``skimage-photos``: 8 colour photos bundled with scikit-image (always offline), label = photo.
  Each photo is resized so its short side is ``2 * resolution``; items are ``resolution``-square
  crops at seeded random positions (a crop spans half the short side), 64 per photo for ``train``
  and 16 for ``test`` from a different seed. Test crops are other windows of the same photos.
- ``photos``: colour crops of 9 bundled photographs (scikit-image's and matplotlib's), split into
  train and test by region of each photo, label = photo (``photos.py`` documents the choices).
- ``cifar10``: the python-version batches from ``root``, ``$CART_DATA_DIR`` or the cache, else a
  torchvision download.
- ``imagefolder``: ``root/<class>/<image>`` (ImageNet/OpenImages); ``root/train`` and ``root/val``
  (or ``test``) are the splits when present, else a stable 1-in-10 hold-out by path hash is the
  test split. Images are PIL-decoded, converted to RGB (grey/CMYK/palette; alpha is composited on
  white, 16-bit grey keeps its top 8 bits), EXIF-rotated, centre-cropped to a square and resized.

Training and token extraction read every dataset through the streaming path of
:mod:`cartlib.data.stream` (lazy reads, VAR's augmentation from :mod:`cartlib.data.augment`,
DataLoader workers, step-exact batches sharded over processes, the bases switch);
:mod:`cartlib.data.synthetic` writes a synthetic image folder for tests and benchmarks.

To add a dataset, write ``builder(split, resolution, root, limit, bad_files, download, progress)``
returning a Dataset with ``name``, ``classes``, ``num_classes``, ``source`` and ``key``, and add it
to :data:`DATASETS`.

Design decisions: resizing is bilinear with antialiasing everywhere (torch ``interpolate(...,
antialias=True)`` on tensors, PIL's antialiased BILINEAR on files; both match), and in-memory
datasets are resized once at construction and kept as uint8 (like an 8-bit image file) when that
fits in :data:`CACHE_BYTES`, else per item. ``limit`` takes the first N items of a fixed order;
imagefolder orders files by a hash of their relative path and skimage-photos interleaves photos,
so a limit spans the classes.

Bad files (``bad_files``): imagefolder checks every file's header (PIL ``verify``) at construction
in the main process; with ``"error"`` an unreadable file raises :class:`BadFileError` naming it,
with ``"skip"`` the bad files are left out and one warning gives their count and the first few. A
file that passes the header check but fails to decode later (a truncated JPEG) raises the same
error naming the file, or with ``"skip"`` is replaced by the next decodable item and warned about
(once per file and process) — never silently dropped.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from cartlib.checks import check_images  # noqa: F401  (re-exported: cartlib.data.check_images)
from cartlib.config import ConfigError, DataConfig
from cartlib.data.arrays import (  # noqa: F401  (re-exported)
    CROPS_PER_PHOTO,
    FASHION_CLASSES,
    SKIMAGE_PHOTOS,
    ArrayDataset,
    cifar10,
    fashion_mnist,
    read_idx,
    resize_uint8,
    skimage_photos,
)
from cartlib.data.common import (  # noqa: F401  (re-exported)
    SPLITS,
    BadFileError,
    DatasetUnavailableError,
    _check_args,
)
from cartlib.data.folder import (  # noqa: F401  (re-exported)
    IMAGE_EXTENSIONS,
    ImageFolderDataset,
    imagefolder,
    imagefolder_identity,
    imagefolder_num_classes,
    load_image,
)
from cartlib.data.photos import PHOTOS, photo_crops  # noqa: F401  (re-exported)

# -------------------------------------------------------------------------------------- registry
DATASETS: dict[str, Callable[..., Dataset]] = {
    "fashion-mnist": fashion_mnist,
    "skimage-photos": skimage_photos,
    "photos": photo_crops,
    "cifar10": cifar10,
    "imagefolder": imagefolder,
}


def load_dataset(
    name="fashion-mnist",
    split="train",
    resolution=32,
    root=None,
    limit=None,
    bad_files="error",
    download=None,
    progress=True,
) -> Dataset:
    """The registered dataset ``name``: items ``(image float32 (3, R, R) in [0, 1], label int)``.

    ``limit`` keeps the first N items (a fixed order); ``download=False`` never goes online
    (``None``/``True``: a torchvision download is the last resort); ``bad_files`` is
    ``"error"`` or ``"skip"`` (see the module docstring).
    """
    if name not in DATASETS:
        close = difflib.get_close_matches(name, DATASETS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown dataset {name!r}: {hint}valid names are {', '.join(DATASETS)}")
    _check_args(split, resolution, limit, bad_files)
    return DATASETS[name](split, resolution, root, limit, bad_files, download, progress)


def load_dataset_from_config(cfg: DataConfig, split: str = "train", **kwargs) -> Dataset:
    """:func:`load_dataset` with the settings of a config's ``data`` section."""
    limit = cfg.train_limit if split == "train" else cfg.test_limit
    return load_dataset(
        cfg.dataset, split, cfg.resolution, cfg.root, limit, cfg.bad_files, **kwargs
    )


def dataset_identity(cfg: DataConfig, split: str = "train") -> str | None:
    """The ``identity()`` of a config's dataset split as it is on this machine now, cheaply: an
    image folder is listed and stat'ed (no image is read), an in-memory dataset hashed. None
    when the data is not here (tokens extracted elsewhere train without their images)."""
    try:
        if cfg.dataset == "imagefolder":
            root = cfg.root or os.environ.get("CART_DATA_DIR")
            if not root or not Path(root).expanduser().is_dir():
                return None
            return imagefolder_identity(root, split)
        dataset = load_dataset_from_config(cfg, split, download=False, progress=False)
    except DatasetUnavailableError:
        return None
    identity = getattr(dataset, "identity", None)
    return identity() if identity else None


def make_loader(dataset, batch_size, shuffle=True, seed=0, num_workers=0, drop_last=None):
    """A DataLoader whose order depends only on ``seed``; ``drop_last`` defaults to ``shuffle``
    (training drops the ragged last batch, evaluation keeps every item)."""
    drop_last = shuffle if drop_last is None else drop_last
    if drop_last and batch_size > len(dataset):
        raise ValueError(
            f"batch_size={batch_size} exceeds the {len(dataset)} items of "
            f"{getattr(dataset, 'key', 'the dataset')} with drop_last=True, so there "
            "would be no batch; lower batch_size or raise the limit"
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
    )


def check_dataset(name: str = "fashion-mnist", root: str | None = None, download=None) -> int:
    """Print where dataset ``name`` is and its size (return 0), or how to get it (return 1)."""
    try:
        kwargs = {"root": root, "download": download, "progress": False}
        train, test = (load_dataset(name, s, **kwargs) for s in SPLITS)
    except (DatasetUnavailableError, BadFileError, ValueError) as e:
        print(f"cartlib: {e}", flush=True)
        return 1
    print(
        f"cartlib: {name} found at {train.source}: {len(train)} train + {len(test)} test "
        f"images, {train.num_classes} classes"
    )
    return 0
