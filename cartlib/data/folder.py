"""Image folders (ImageNet, OpenImages, your own): ``root/<class>/<image>``, decoded per access.

See :mod:`cartlib.data` for the split rules and the bad-file policy. A class folder that holds no
image file (in any split) is not a class: it is left out with a warning naming it, so labels and
the class count are those of the data. A split whose every file is unreadable is an error under
either policy.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from cartlib.data.augment import Crop, centre, crop_pil, mid_size
from cartlib.data.common import BadFileError, DatasetUnavailableError

T = TypeVar("T")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: 16-bit grey keeps its top 8 bits, transparency goes on white, 32-bit
    float grey is read as [0, 1] when no value exceeds 1 (else as 0-255). A float image holding
    NaN or infinity is refused (ValueError): there is no pixel value to give it."""
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if not np.isfinite(a).all():
            raise ValueError(
                f"the float image holds {int((~np.isfinite(a)).sum())} NaN or infinite value(s)"
            )
        scale = 255.0 if a.size and a.max() <= 1.0 else 1.0  # [0, 1] floats, or 0-255
        im = Image.fromarray(np.clip(np.round(a * scale), 0, 255).astype(np.uint8))
    if im.mode in ("I", "I;16", "I;16B", "I;16L"):
        im = Image.fromarray(np.clip(np.asarray(im).astype(np.int64) >> 8, 0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
    return im.convert("RGB")


def read_image(
    path: str | Path, resolution: int, mid_ratio: float = 1.0, req: Crop | None = None
) -> np.ndarray:
    """Decode one file to uint8 (R, R, 3): RGB, EXIF-rotated, shorter side resized to
    ``mid_ratio x R``, cropped and mirrored as ``req`` says (default: the centre crop)."""
    short = mid_size(resolution, mid_ratio)
    with Image.open(path) as im:
        im.draft("RGB", (short, short))  # JPEG: DCT downscale, both sides stay >= short
        _check_pixels(im)
        im = to_rgb(ImageOps.exif_transpose(im))
    return crop_pil(im, resolution, mid_ratio, req or centre(0))


# Images decoded at more pixels than this are refused (after a JPEG's reduced-size decode, so a
# large JPEG passes): a 12000 x 12000 PNG (420 KB on disk, under PIL's bomb limit) took 2.3 GB to
# decode, and a folder of them with several loader workers runs out of memory.
MAX_PIXELS_ENV = "CART_MAX_IMAGE_PIXELS"
MAX_PIXELS = 40_000_000


def _check_pixels(im: Image.Image) -> None:
    limit = int(float(os.environ.get(MAX_PIXELS_ENV, MAX_PIXELS)))
    w, h = im.size
    if w * h > limit:
        raise ValueError(
            f"it is {w} x {h} = {w * h / 1e6:.0f} MP, more than the {limit / 1e6:.0f} MP cartlib "
            f"decodes ({w * h * 16 / 1e9:.1f} GB or so to decode, per loader worker): resize it, "
            f"or raise ${MAX_PIXELS_ENV}"
        )


def load_image(path: str | Path, resolution: int) -> torch.Tensor:
    """Decode one file to float (3, R, R) in [0, 1]: RGB, EXIF-rotated, centre square, resized."""
    return torch.from_numpy(read_image(path, resolution)).permute(2, 0, 1).float().div_(255)


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


def _walk(top: Path):
    """``os.walk`` following folder links (ImageNet is often a tree of links), refusing one that
    leads to a folder already listed: a loop would never end, and a second link to a folder
    would count its images twice (and a link to a parent invent a class)."""
    seen: dict[str, str] = {}
    for d, dirs, names in os.walk(top, followlinks=True):
        real = os.path.realpath(d)
        if real in seen:
            raise ValueError(
                f"{d} leads to {seen[real]} again through a folder link (a loop, or a second "
                "link to one folder): remove or replace that link, then run again"
            )
        seen[real] = d
        yield d, dirs, names


def _has_image(folder: Path) -> bool:
    for _, _, names in _walk(folder):
        if any(Path(f).suffix.lower() in IMAGE_EXTENSIONS for f in names):
            return True
    return False


def _class_names(root: Path, present: list[Path]) -> list[str]:
    """Sorted class folder names of an ImageFolder tree (across its split folders, if any).

    With split folders (train/, val/) they must hold the same class folders, else a label would
    mean different classes in different splits. A folder without an image file in any split is
    not a class (a warning names it): it would be a label no image carries."""
    is_class = lambda d: d.is_dir() and not d.name.startswith(".")
    per_split = {t.name: {d.name for d in t.iterdir() if is_class(d)} for t in present or [root]}
    union = set().union(*per_split.values())
    odd = {name: sorted(union - names) for name, names in per_split.items() if names != union}
    if odd:
        names = lambda m: ", ".join(m[:5]) + (", ..." if len(m) > 5 else "")
        detail = "; ".join(
            f"{s}/ lacks {len(m)} class folder(s) ({names(m)})" for s, m in odd.items()
        )
        raise ValueError(
            f"the split folders of {root} hold different class lists: {detail}. Labels are "
            "indices into one sorted class list, so every split needs the same class folders: "
            "add the missing ones (an empty folder will do) or remove the extra ones"
        )
    tops = present or [root]
    classes = {c for c in union if any(_has_image(t / c) for t in tops if (t / c).is_dir())}
    empty = sorted(union - classes)
    if empty:
        warnings.warn(
            f"{root}: class folder(s) without images are not classes: {', '.join(empty[:10])}"
            f"{' ...' if len(empty) > 10 else ''} ({len(classes)} classes remain)",
            stacklevel=2,
        )
    return sorted(classes)


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
    for d, _, names in _walk(folder or root):
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


def listing_identity(root: Path, items: list[tuple[Path, str]]) -> str:
    """sha1 of a split's listing, in order: each file's path under ``root``, class, size and
    mtime_ns (stat'ed, not read; every listed file, readable or not). Names alone miss an image
    rewritten in place; sizes and times catch it without reading a pixel. A copy of the data made
    without keeping times (plain ``cp``, not ``cp -a``/``rsync -a``) counts as other images."""
    h = hashlib.sha1()
    for path, cls in items:
        st = os.stat(path)
        rel = path.relative_to(root)
        h.update(f"{rel}\0{cls}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def imagefolder_identity(root: str | os.PathLike, split: str) -> str:
    """:meth:`ImageFolderDataset.identity` of a split without opening the dataset (the folders
    are listed and the files stat'ed; no header is read): what a consumer of token shards
    compares with the identity they were extracted from."""
    root = Path(root).expanduser().resolve()
    items, _ = _list_images(root, split)
    return listing_identity(root, items)


class ImageFolderDataset(Dataset):
    """Images decoded from files on every access (see the module docstring for bad files).

    The file list is one numpy bytes array of paths relative to the root (``files`` builds the
    Path list on demand): at ImageNet size a list of Path objects is hundreds of MB that every
    forked DataLoader worker would copy page by page as it touches their reference counts."""

    def __init__(
        self, root, split, resolution, files, labels, classes, bad_files, skipped, identity=""
    ):
        self.name, self.split, self.resolution = "imagefolder", split, resolution
        self.source, self.root = str(root), Path(root)
        self._rel = np.array([str(Path(p).relative_to(root)).encode() for p in files], dtype=bytes)
        self.labels = np.asarray(labels, dtype=np.int32)
        self.classes, self.bad_files = classes, bad_files
        self.skipped = skipped  # [(path, reason)] found at construction or decode time
        self.key = f"imagefolder-{_hash(str(root)).hex()[:8]}-{split}-r{resolution}-n{len(files)}"
        self._identity = identity

    @property
    def files(self) -> list[Path]:
        return [self.path(i) for i in range(len(self))]

    def path(self, i: int) -> Path:
        return self.root / self._rel[i].decode()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self._rel)

    def identity(self) -> str:
        """What the split's images are (:func:`listing_identity` of the folder's listing when it
        was opened): an image added, removed, renamed, moved to another class or rewritten in
        place changes it. Token shards record it; their consumers compare it."""
        return self._identity

    def content_signature(self, n: int) -> str:
        """sha1 of the path, size and mtime_ns of every file (keys the decomposition cache: an
        image edited, replaced or touched since changes it). ``n`` is ignored: a bad file's item
        is decoded from the next file, so any file may stand in for one of the first n."""
        h = hashlib.sha1()
        for k in range(len(self)):
            p = self.path(k)
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.read(i, lambda path: load_image(path, self.resolution))

    def read(self, i: int, decode: Callable[[Path], T]) -> tuple[T, int]:
        """(``decode(path)``, label) of item ``i``; a file that fails to decode raises, or with
        ``bad_files="skip"`` is warned about and the next decodable item stands in."""
        for j in range(len(self)):
            k = (i + j) % len(self)
            try:
                return decode(self.path(k)), int(self.labels[k])
            except Exception as e:  # any decode failure, reported with the file's path
                self._bad(self.path(k), f"{type(e).__name__}: {e}", e)
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


_SCANNED: dict[tuple, tuple[list, list]] = {}  # listing -> scan result, within this process


def _group() -> tuple[int, int]:
    """(rank, world size) of the launched process group, (0, 1) outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_files(items: list, progress: bool) -> list[str | None]:
    """The header check of every item (None = readable), on a thread pool; under a launched
    process group each process checks every world-th item and the results are exchanged, so
    1.28 M ImageNet headers are read once per cluster, not once per GPU."""
    import torch.distributed as dist

    rank, world = _group()
    mine = items[rank::world]
    with ThreadPoolExecutor(min(16, 4 * (os.cpu_count() or 1))) as pool:
        bar = tqdm(total=len(mine), desc="checking images", disable=not progress or rank > 0)
        found = []
        for err in pool.map(_verify, [p for p, _ in mine]):
            found.append(err)
            bar.update()
        bar.close()
    if world == 1:
        return found
    listing = hashlib.sha1("\0".join(str(p) for p, _ in items).encode()).hexdigest()
    bad = [(rank + world * j, err) for j, err in enumerate(found) if err is not None]
    every: list = [None] * world
    dist.all_gather_object(every, (listing, bad))
    if len({lst for lst, _ in every}) > 1:
        raise DatasetUnavailableError(
            f"the processes list different files under the data root ({len(items)} here, in "
            f"process {rank}): every machine must see the same dataset (a shared or identical "
            "copy of data.root)"
        )
    errors: list[str | None] = [None] * len(items)
    for _, their_bad in every:
        for i, err in their_bad:
            errors[i] = err
    return errors


def _scan(items: list, limit: int | None, progress: bool) -> tuple[list, list]:
    """Header-check items in order until ``limit`` good ones: (good items, [(path, reason)]).
    A listing already checked in this process is not checked again (a stage that checks its
    data root first, then trains from it)."""
    key = (tuple(items), limit)
    if key in _SCANNED:
        good, bad = _SCANNED[key]
        return list(good), list(bad)
    good, bad, pos = [], [], 0
    while pos < len(items) and (limit is None or len(good) < limit):
        chunk = items[pos : pos + (len(items) if limit is None else limit - len(good))]
        pos += len(chunk)
        for item, err in zip(chunk, _check_files(chunk, progress), strict=True):
            if err is None:
                good.append(item)
            else:
                bad.append((item[0], err))
    _SCANNED.clear()  # one listing kept: ImageNet's is ~100 MB of paths
    _SCANNED[key] = (list(good), list(bad))
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
    if not good:
        raise BadFileError(
            f"none of the {len(bad)} image file(s) for split={split!r} under {root} can be "
            f"read: {names}. Skipping them (bad_files='skip') leaves no images: repair or "
            "replace them"
        )
    if bad:
        warnings.warn(
            f"skipped {len(bad)} unreadable image file(s) under {root}: {names}", stacklevel=3
        )
    files = [p for p, _ in good]
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[c] for _, c in good]
    identity = listing_identity(root, items)
    return ImageFolderDataset(
        root, split, resolution, files, labels, classes, bad_files, bad, identity
    )
