"""In-memory datasets: Fashion-MNIST (idx files), CIFAR-10 (python pickles), scikit-image photos.

Held as uint8 (N, C, h, w); see :mod:`cartlib.data` for where each comes from.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cartlib.data.common import SPLITS, BadFileError, DatasetUnavailableError
from cartlib.io import cache_dir
from cartlib.trust import UnsafeFileError, restricted_load

CACHE_BYTES = 1 << 30  # pre-resize in-memory datasets up to this many uint8 bytes
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]  # fmt: skip
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry",
                  "hubble_deep_field", "retina", "motorcycle")  # fmt: skip
CROPS_PER_PHOTO = {"train": 64, "test": 16}


def resize_uint8(x: torch.Tensor, resolution: int | tuple[int, int]) -> torch.Tensor:
    """Resize uint8 images (N, C, h, w) to ``resolution`` (an int: square): bilinear, antialiased.

    torch's uint8 CPU kernel is used directly: 2-3x faster than a float round trip, within 1 level.
    """
    size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", antialias=True)


class ArrayDataset(Dataset):
    """Images held in memory as uint8 (N, C, h, w), C = 1 or 3; items are float (3, R, R) in [0,
    1]. Resized once at construction when the result fits in CACHE_BYTES, else per item."""

    def __init__(self, name, split, images, labels, classes, resolution, source):
        self.name, self.split, self.classes, self.source = name, split, list(classes), str(source)
        self.resolution = resolution
        self.labels = torch.from_numpy(np.array(labels, dtype=np.int64))
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"{name}: images must be uint8 (N, C, h, w) with C = 1 or 3, values 0-255; got "
                f"{images.dtype} {tuple(images.shape)}. From floats in [0, 1]: "
                "(x * 255).round().to(torch.uint8)"
            )
        n, c = images.shape[:2]
        self.lazy = n * c * resolution**2 > CACHE_BYTES
        self.images = images if self.lazy else resize_uint8(images, resolution)
        self.key = f"{name}-{split}-r{resolution}-n{n}"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def content_signature(self, n: int) -> str:
        """sha256 of the pixels of the first ``n`` items (keys the decomposition cache)."""
        return hashlib.sha256(self.images[:n].contiguous().numpy()).hexdigest()

    def identity(self) -> str:
        """sha256 of every image's pixels and every label (a fraction of a second for
        Fashion-MNIST's 60k): what token shards record and their consumers compare."""
        h = hashlib.sha256(self.images.contiguous().numpy())
        h.update(self.labels.numpy().tobytes())
        return h.hexdigest()[:16]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i]  # (C, h, w) uint8
        if self.lazy:
            x = resize_uint8(x[None], self.resolution)[0]
        return x.expand(3, -1, -1).float().div(255), int(self.labels[i])


# --------------------------------------------------------------------------------- fashion-mnist
def read_idx(path: Path, limit: int | None = None) -> np.ndarray:
    """The uint8 array in an idx file (gzip'd or not), only its first ``limit`` entries."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            (magic,) = struct.unpack(">I", f.read(4))
            if magic >> 8 != 0x08:  # 0x0008nn: unsigned bytes, nn dimensions
                raise ValueError(f"magic number {magic:#x} is not that of a uint8 idx file")
            dims = struct.unpack(f">{magic & 0xFF}I", f.read(4 * (magic & 0xFF)))
            n = dims[0] if limit is None else min(limit, dims[0])
            count = n * int(np.prod(dims[1:], dtype=np.int64))
            data = f.read(count)
    except (OSError, EOFError, ValueError, struct.error) as e:
        raise BadFileError(
            f"{path} is not a readable idx file ({e}); reinstall or delete it "
            "so that it is fetched again"
        ) from e
    if len(data) != count:
        raise BadFileError(f"{path} is truncated ({len(data)} of {count} bytes); reinstall it")
    return np.frombuffer(bytearray(data), np.uint8).reshape(n, *dims[1:])  # writable


def _idx_file(folder: Path, stem: str) -> Path | None:
    return next((p for p in (folder / f"{stem}.gz", folder / stem) if p.is_file()), None)


def _search_dirs(root, subdirs: tuple[str, ...]) -> list[Path]:
    """root, then $CART_DATA_DIR, each with the dataset's usual subfolders, in that order."""
    bases = [Path(b).expanduser() for b in (root, os.environ.get("CART_DATA_DIR")) if b]
    return [d for b in bases for d in (b, *(b / s for s in subdirs))]


def _fashion_dirs(root) -> list[Path]:
    tv = cache_dir("data") / "FashionMNIST" / "raw"
    return [*_search_dirs(root, ("fashion-mnist", "FashionMNIST/raw")), DEBIAN_FASHION_MNIST, tv]


def _find_fashion(root) -> Path | None:
    stems = [s for pair in IDX_FILES.values() for s in pair]
    return next((d for d in _fashion_dirs(root) if all(_idx_file(d, s) for s in stems)), None)


def _download_note(download, fetch: Callable[[], object]) -> str:
    """Try ``fetch`` (a torchvision download) unless disabled; '' on success, else the reason."""
    if download is False:
        return "download: disabled (download=False)"
    try:
        fetch()
    except Exception as e:  # offline: URLError, RuntimeError, ... — reported, not raised
        return f"download: failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    return ""


def _unavailable(what: str, root, looked: list[Path], note: str, ways: list[str]) -> Exception:
    env = os.environ.get("CART_DATA_DIR")
    where = "\n".join([f"  (root={root!r}, CART_DATA_DIR={env!r})", *(f"  - {d}" for d in looked)])
    steps = "\n".join(f"  {i}. {w}" for i, w in enumerate(ways, 1))
    return DatasetUnavailableError(
        f"{what} was not found. Looked in:\n{where}\n"
        + (f"  ({note})\n" if note else "")
        + f"Get it in one of these ways:\n{steps}"
    )


def _fetch_fashion() -> None:
    from torchvision.datasets import FashionMNIST  # imported only when a download is tried

    FashionMNIST(cache_dir("data"), download=True)


def fashion_mnist(split, resolution, root, limit, bad_files, download, progress):
    """Fashion-MNIST (60k train, 10k test, 28x28 grey, 10 classes) from the first folder holding
    the four idx files; see the module docstring for the search order."""
    folder = _find_fashion(root)
    note = "" if folder else _download_note(download, _fetch_fashion)
    folder = folder or _find_fashion(root)
    if folder is None:
        files = ", ".join(s + ".gz" for pair in IDX_FILES.values() for s in pair)
        raise _unavailable(
            "Fashion-MNIST",
            root,
            _fashion_dirs(root),
            note,
            [
                "Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist "
                f"(installs {DEBIAN_FASHION_MNIST})",
                f"set CART_DATA_DIR to a folder with the four idx files ({files})",
                f"run once online so torchvision downloads it into {cache_dir('data')}",
            ],
        )
    img_stem, lbl_stem = IDX_FILES[split]
    images = read_idx(_idx_file(folder, img_stem), limit)
    labels = read_idx(_idx_file(folder, lbl_stem), limit)
    x = torch.from_numpy(images)[:, None]  # (N, 1, 28, 28)
    return ArrayDataset("fashion-mnist", split, x, labels, FASHION_CLASSES, resolution, folder)


# --------------------------------------------------------------------------------------- cifar10
def _cifar_dirs(root) -> list[Path]:
    return [*_search_dirs(root, ("cifar10", "cifar-10")), cache_dir("data")]


def _find_cifar(root) -> Path | None:
    found = (d / "cifar-10-batches-py" for d in _cifar_dirs(root))
    return next((d for d in found if (d / "batches.meta").is_file()), None)


def _fetch_cifar() -> None:
    from torchvision.datasets import CIFAR10  # imported only when a download is tried

    CIFAR10(cache_dir("data"), download=True)


# What CIFAR-10's python batches pickle: dicts of lists, strings and one uint8 numpy array (and
# codecs.encode, which Python 3 writes for bytes into protocol-2 pickles of the same data)
CIFAR_GLOBALS = {
    "_codecs": {"encode"},
    "numpy.core.multiarray": {"_reconstruct"},
    "numpy._core.multiarray": {"_reconstruct"},
    "numpy": {"ndarray", "dtype"},
}


def _unpickle(path: Path) -> dict:
    """One file of CIFAR-10's python version: a pickle, read admitting only the numpy array
    pieces it holds (:func:`cartlib.trust.restricted_load`; a file wanting more is refused)."""
    try:
        return restricted_load(path, CIFAR_GLOBALS, encoding="latin1")
    except UnsafeFileError:
        raise
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise BadFileError(
            f"{path} is unreadable ({e}); delete the folder and fetch it again"
        ) from e


def cifar10(split, resolution, root, limit, bad_files, download, progress):
    """CIFAR-10 (50k train, 10k test, 32x32 colour): the python-version pickles read directly from
    the first folder holding ``cifar-10-batches-py/``; torchvision only downloads it."""
    folder = _find_cifar(root)
    note = "" if folder else _download_note(download, _fetch_cifar)
    folder = folder or _find_cifar(root)
    if folder is None:
        raise _unavailable(
            "CIFAR-10 (cifar-10-batches-py/)",
            root,
            _cifar_dirs(root),
            note,
            [
                "set CART_DATA_DIR (or root) to a folder holding cifar-10-batches-py/ (the 'python "
                "version' from https://www.cs.toronto.edu/~kriz/cifar.html)",
                f"run once online so torchvision downloads it into {cache_dir('data')}",
            ],
        )
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        if limit is not None and len(labels) >= limit:
            break
        batch = _unpickle(folder / name)
        images.append(np.asarray(batch["data"], np.uint8).reshape(-1, 3, 32, 32))
        labels += batch["labels"]
    x = torch.from_numpy(np.concatenate(images)[:limit])  # (N, 3, 32, 32)
    classes = _unpickle(folder / "batches.meta")["label_names"]
    return ArrayDataset("cifar10", split, x, labels[:limit], classes, resolution, folder)


# -------------------------------------------------------------------------------- skimage-photos
def skimage_photo(name: str) -> torch.Tensor:
    import skimage.data

    load = skimage.data.stereo_motorcycle if name == "motorcycle" else getattr(skimage.data, name)
    rgb = load()[0] if name == "motorcycle" else load()
    return torch.from_numpy(np.ascontiguousarray(rgb[..., :3])).permute(2, 0, 1)  # (3, H, W)


def skimage_photos(split, resolution, root, limit, bad_files, download, progress):
    """Seeded square crops of scikit-image's bundled colour photos (see the module docstring)."""
    per_photo, n_photos = CROPS_PER_PHOTO[split], len(SKIMAGE_PHOTOS)
    n = per_photo * n_photos if limit is None else min(limit, per_photo * n_photos)
    crops = np.empty((n, 3, resolution, resolution), np.uint8)  # numpy: small copies, no threads
    for p, name in enumerate(SKIMAGE_PHOTOS):
        photo = skimage_photo(name)
        h, w = photo.shape[1:]
        scale = 2 * resolution / min(h, w)
        size = (max(2 * resolution, round(h * scale)), max(2 * resolution, round(w * scale)))
        photo = resize_uint8(photo[None], size)[0].contiguous().numpy()  # short side 2 * res
        rng = np.random.default_rng([SPLITS.index(split), p])  # disjoint seeds per split
        tops = rng.integers(0, size[0] - resolution + 1, per_photo)
        lefts = rng.integers(0, size[1] - resolution + 1, per_photo)
        for i in range(p, n, n_photos):  # item i = crop i // n_photos of photo i % n_photos
            t, left = tops[i // n_photos], lefts[i // n_photos]
            crops[i] = photo[:, t : t + resolution, left : left + resolution]
    labels = [i % n_photos for i in range(n)]
    x = torch.from_numpy(crops)
    return ArrayDataset(
        "skimage-photos", split, x, labels, SKIMAGE_PHOTOS, resolution, "skimage.data"
    )
