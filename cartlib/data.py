"""Datasets: one registry of named image datasets, all yielding ``(image, label)`` with the image a
float32 tensor in [0, 1] of shape (3, resolution, resolution) — step 1 of the data flow.

Registry (:data:`DATASETS`, name -> builder):

- ``fashion-mnist`` (default): the gzip'd idx files, read with numpy, from ``root``, then
  ``$CART_DATA_DIR`` (the folder, its ``fashion-mnist/`` or ``FashionMNIST/raw/``), Debian's
  ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist), torchvision's copy in the cache,
  and last a torchvision download when online. Grey is replicated to 3 channels.
- ``skimage-photos``: 8 colour photos bundled with scikit-image (always offline), label = photo.
  Each photo is resized so its short side is ``2 * resolution``; items are ``resolution``-square
  crops at seeded random positions (a crop spans half the short side), 64 per photo for ``train``
  and 16 for ``test`` from a different seed. Test crops are other windows of the same photos.
- ``cifar10``: the python-version batches from ``root``, ``$CART_DATA_DIR`` or the cache, else a
  torchvision download.
- ``imagefolder``: ``root/<class>/<image>`` (ImageNet/OpenImages); ``root/train`` and ``root/val``
  (or ``test``) are the splits when present, else a stable 1-in-10 hold-out by path hash is the
  test split. Images are PIL-decoded, converted to RGB (grey/CMYK/palette; alpha is composited on
  white, 16-bit grey keeps its top 8 bits), EXIF-rotated, centre-cropped to a square and resized.

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
import gzip
import hashlib
import os
import pickle
import struct
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cartlib.config import ConfigError, DataConfig
from cartlib.runs import cache_dir

SPLITS = ("train", "test")
BAD_FILE_POLICIES = ("error", "skip")
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
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


class DatasetUnavailableError(RuntimeError):
    """The dataset is not on this machine and could not be downloaded; the message says how to
    get it."""


class BadFileError(RuntimeError):
    """A data file is corrupt or unreadable; the message names it and the fix."""


# --------------------------------------------------------------------------------------- checks
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


def _check_args(split: str, resolution: int, limit: int | None, bad_files: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not known; use one of {', '.join(SPLITS)}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution={resolution!r} must be a positive integer, e.g. 32")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r} must be a positive integer or None (all items)")
    if bad_files not in BAD_FILE_POLICIES:
        raise ValueError(f"bad_files={bad_files!r} must be 'error' or 'skip'")


# ---------------------------------------------------------------------------- in-memory datasets
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
        n, c = images.shape[:2]
        self.lazy = n * c * resolution**2 > CACHE_BYTES
        self.images = images if self.lazy else resize_uint8(images, resolution)
        self.key = f"{name}-{split}-r{resolution}-n{n}"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i]  # (C, h, w) uint8
        if self.lazy:
            x = resize_uint8(x[None], self.resolution)[0]
        return x.expand(3, -1, -1).float().div_(255), int(self.labels[i])


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


def _unpickle(path: Path) -> dict:
    """One file of CIFAR-10's python version (trusted: as torchvision, it is a pickle)."""
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
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
def _skimage_photo(name: str) -> torch.Tensor:
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
        photo = _skimage_photo(name)
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


# ----------------------------------------------------------------------------------- imagefolder
def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: 16-bit grey keeps its top 8 bits, transparency goes on white."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L"):
        im = Image.fromarray(np.clip(np.asarray(im).astype(np.int64) >> 8, 0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
    return im.convert("RGB")


def load_image(path: str | Path, resolution: int) -> torch.Tensor:
    """Decode one file to float (3, R, R) in [0, 1]: RGB, EXIF-rotated, centre square, resized."""
    with Image.open(path) as im:
        im.draft("RGB", (resolution, resolution))  # JPEG: DCT downscale, both sides stay >= R
        im = _to_rgb(ImageOps.exif_transpose(im))
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    im = im.resize((resolution, resolution), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div_(255)


def _verify(path: Path) -> str | None:
    """None if PIL can parse the file's header, else the reason."""
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return f"{type(e).__name__}: {e}"
    return None


def _hash(text: str) -> bytes:
    return hashlib.sha1(text.encode()).digest()


def _class_names(root: Path, present: list[Path]) -> list[str]:
    """Sorted class folder names of an ImageFolder tree (across its split folders, if any)."""
    is_class = lambda d: d.is_dir() and not d.name.startswith(".")
    return sorted({d.name for t in present or [root] for d in t.iterdir() if is_class(d)})


def imagefolder_num_classes(root: str | os.PathLike) -> int:
    """Number of classes of an ImageFolder tree from its folder names alone (no image is read)."""
    root = Path(root).expanduser()
    present = [root / s for s in ("train", "val", "test") if (root / s).is_dir()]
    return max(1, len(_class_names(root, present)))


def _list_images(root: Path, split: str) -> tuple[list[tuple[Path, str]], list[str]]:
    """(path, class) of the split's images in hash order, and the sorted class names."""
    splits = {"train": ("train",), "test": ("val", "test")}
    present = [root / s for s in ("train", "val", "test") if (root / s).is_dir()]
    folder = next((root / s for s in splits[split] if (root / s).is_dir()), None)
    if present and folder is None:
        raise ValueError(
            f"{root} has {', '.join(p.name for p in present)}/ but no folder for "
            f"split={split!r} (looked for {', '.join(splits[split])}/)"
        )
    classes = _class_names(root, present)
    items = []
    for d, _, names in os.walk(folder or root, followlinks=True):
        parts = Path(d).relative_to(folder or root).parts
        cls = (parts[0] if parts and parts[0] in classes else None) if classes else root.name
        if cls is not None:
            items += [
                (Path(d, f), cls) for f in names if Path(f).suffix.lower() in IMAGE_EXTENSIONS
            ]
    if folder is None:  # no split folders: a stable 1-in-10 hold-out chosen by path hash
        test = [_hash("split:" + str(p.relative_to(root)))[0] % 10 == 0 for p, _ in items]
        items = [item for item, t in zip(items, test, strict=True) if t == (split == "test")]
    items.sort(key=lambda pc: _hash(str(pc[0].relative_to(root))))
    return items, classes or [root.name]


class ImageFolderDataset(Dataset):
    """Images decoded from files on every access (see the module docstring for bad files)."""

    def __init__(self, root, split, resolution, files, labels, classes, bad_files, skipped):
        self.name, self.split, self.resolution = "imagefolder", split, resolution
        self.source = str(root)
        self.files, self.labels, self.classes, self.bad_files = files, labels, classes, bad_files
        self.skipped = skipped  # [(path, reason)] found at construction or decode time
        self.key = f"imagefolder-{_hash(str(root)).hex()[:8]}-{split}-r{resolution}-n{len(files)}"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        for j in range(len(self.files)):
            k = (i + j) % len(self.files)
            try:
                return load_image(self.files[k], self.resolution), self.labels[k]
            except Exception as e:  # any decode failure, reported with the file's path
                self._bad(self.files[k], f"{type(e).__name__}: {e}", e)
        raise BadFileError(f"no image in {self.source} could be decoded (split={self.split!r})")

    def _bad(self, path: Path, reason: str, cause: Exception) -> None:
        if self.bad_files == "error":
            raise BadFileError(
                f"cannot decode {path} ({reason}); repair or remove the file, or "
                "set bad_files='skip' to skip such files"
            ) from cause
        if all(p != path for p, _ in self.skipped):
            self.skipped.append((path, reason))
            warnings.warn(
                f"skipped {path} ({reason}); the next image stands in for it "
                f"({len(self.skipped)} skipped so far)",
                stacklevel=3,
            )


def _scan(items: list, limit: int | None, progress: bool) -> tuple[list, list]:
    """Header-check items in order until ``limit`` good ones: (good items, [(path, reason)])."""
    good, bad, pos = [], [], 0
    with ThreadPoolExecutor(min(16, 4 * (os.cpu_count() or 1))) as pool:
        bar = tqdm(total=limit or len(items), desc="checking images", disable=not progress)
        while pos < len(items) and (limit is None or len(good) < limit):
            chunk = items[pos : pos + (len(items) if limit is None else limit - len(good))]
            pos += len(chunk)
            for item, err in zip(chunk, pool.map(_verify, [p for p, _ in chunk]), strict=True):
                if err is None:
                    good.append(item)
                else:
                    bad.append((item[0], err))
            bar.update(len(chunk))
        bar.close()
    return good, bad


def imagefolder(split, resolution, root, limit, bad_files, download, progress):
    """Images under ``root`` (or ``$CART_DATA_DIR``) in ImageFolder layout; see the module doc."""
    root = root or os.environ.get("CART_DATA_DIR")
    if not root or not Path(root).expanduser().is_dir():
        raise DatasetUnavailableError(
            f"imagefolder needs root=<folder> (or CART_DATA_DIR) with "
            f"<class>/<image> inside; got root={root!r}"
        )
    root = Path(root).expanduser().resolve()
    items, classes = _list_images(root, split)
    if not items:
        raise DatasetUnavailableError(
            f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) for split={split!r} under {root}"
        )
    good, bad = _scan(items, limit, progress and len(items) > 2000)
    names = "; ".join(f"{p} ({r})" for p, r in bad[:3]) + ("; ..." if len(bad) > 3 else "")
    if bad and bad_files == "error":
        raise BadFileError(
            f"{len(bad)} unreadable image file(s) under {root}: {names}. Repair or "
            "remove them, or set bad_files='skip' to skip such files"
        )
    if bad:
        warnings.warn(
            f"skipped {len(bad)} unreadable image file(s) under {root}: {names}", stacklevel=3
        )
    files = [p for p, _ in good]
    labels = [classes.index(c) for _, c in good]
    return ImageFolderDataset(root, split, resolution, files, labels, classes, bad_files, bad)


# -------------------------------------------------------------------------------------- registry
DATASETS: dict[str, Callable[..., Dataset]] = {
    "fashion-mnist": fashion_mnist,
    "skimage-photos": skimage_photos,
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
