"""Perceptual distance (LPIPS): a reconstruction metric and the tokenizer's perceptual loss (Eq. 2).

The ``lpips`` package ships only its linear heads; its AlexNet/VGG backbone is torchvision's
ImageNet download, which offline machines (ours, CI) cannot fetch. :func:`lpips_model` resolves,
first match wins (``kind="auto"``):

1. real LPIPS (``lpips`` package, name ``"lpips-alex"`` / ``"lpips-vgg"``) when torchvision's
   backbone file is already in the torch hub cache (``$TORCH_HOME/hub/checkpoints/
   alexnet-owt-7be5be79.pth`` or ``vgg16-397923af.pth``), or when ``CART_ONLINE=1`` (then
   torchvision downloads it once);
2. offline substitute, with a one-time warning: ST-LPIPS (``stlpips-pytorch``, Ghildyal & Liu,
   ECCV 2022, name ``"stlpips-alex"`` / ``"stlpips-vgg"``), the shift-tolerant LPIPS whose package
   ships the FULL network (backbone + heads, ``weights/vST0.0/<net>_shift_tolerant.pth``); same
   design and input convention as LPIPS, but its numbers are not LPIPS numbers, so results name
   the backend (``.name``);
3. otherwise an error that says how to get weights. A randomly initialised backbone is never used:
   every backbone tensor must come from a file, checked by name.

``kind="lpips"`` / ``"stlpips"`` force a backend (and fail the same way when it is impossible).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from cartlib.checks import check_images

KINDS = ("auto", "lpips", "stlpips")
NETS = ("alex", "vgg")
_warned: set[str] = set()


def backbone_file(net: str) -> Path:
    """Where torchvision keeps the ImageNet backbone that real LPIPS needs (may not exist)."""
    from torchvision.models import AlexNet_Weights, VGG16_Weights

    url = {"alex": AlexNet_Weights, "vgg": VGG16_Weights}[net].IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


class PerceptualDistance(nn.Module):
    """d(x, y) for images (B,3,H,W) in [0,1] -> (B,); frozen, always in eval mode.

    Gradients flow to the inputs (a training loss). Runs in float32 with autocast disabled (the
    feature normalisation is fragile in half precision), so it can sit inside an autocast region.
    ``check_range=False`` skips the [0,1] check for unclamped decoder outputs during training.
    """

    def __init__(self, net: nn.Module, name: str, check_range: bool = True):
        super().__init__()
        self.net, self.name, self.check_range = net, name, check_range
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PerceptualDistance:
        return super().train(False)  # a parent's .train() must not switch on the heads' dropout

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.check_range:
            check_images(x, "x", channels=3)
            check_images(y, "y", channels=3)
        elif x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x must be (B,3,H,W), got {tuple(x.shape)}")
        if x.shape != y.shape:
            raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must have the same shape")
        with torch.autocast(x.device.type, enabled=False):
            d = self.net(x.float(), y.float(), normalize=True)  # (B, 1, 1, 1); [0,1] -> [-1,1]
        return d.reshape(-1)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def _real_lpips(net: str) -> nn.Module:
    import lpips

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(pretrained|weights).*")  # torchvision API
        return lpips.LPIPS(net=net, verbose=False)


def _stlpips(net: str) -> nn.Module:
    try:
        from stlpips_pytorch.stlpips import LPIPS as STLPIPS
    except ImportError as e:
        raise RuntimeError(
            f"no perceptual network available: the offline substitute needs stlpips-pytorch "
            f"({e}; `pip install stlpips-pytorch torchsummary`), real LPIPS needs "
            f"{backbone_file(net)} (copy it from an online machine, or set CART_ONLINE=1)"
        ) from e
    model = STLPIPS(net=net, variant="shift_tolerant", pretrained=False, verbose=False)
    import stlpips_pytorch

    path = (
        Path(stlpips_pytorch.__file__).parent / "weights" / "vST0.0" / f"{net}_shift_tolerant.pth"
    )
    state = torch.load(path, map_location="cpu", weights_only=True)
    res = model.load_state_dict(state, strict=False)
    # `lins.i` is a second name of `lin{i}` (the same module), the file stores only the latter.
    missing = [k for k in res.missing_keys if k.replace("lins.", "lin", 1) not in state]
    if missing or res.unexpected_keys:
        raise RuntimeError(
            f"{path} does not cover the ST-LPIPS network: missing {missing}, "
            f"unexpected {res.unexpected_keys}; reinstall stlpips-pytorch"
        )
    return model


def lpips_model(
    kind: str = "auto",
    net: str = "alex",
    device: str | torch.device | None = None,
    check_range: bool = True,
) -> PerceptualDistance:
    """The perceptual distance, resolved as the module docstring says; ``.name`` says which."""
    if kind not in KINDS or net not in NETS:
        raise ValueError(f"kind={kind!r}, net={net!r}: choose kind from {KINDS}, net from {NETS}")
    have_backbone = backbone_file(net).is_file() or os.environ.get("CART_ONLINE") == "1"
    if kind == "lpips" and not have_backbone:
        raise RuntimeError(
            f"real LPIPS needs torchvision's ImageNet {net} backbone, not found at "
            f"{backbone_file(net)}: copy it there from an online machine, or set CART_ONLINE=1 "
            "to download it, or use kind='stlpips' (the offline substitute)"
        )
    if kind == "lpips" or (kind == "auto" and have_backbone):
        model, name = _real_lpips(net), f"lpips-{net}"
    else:
        if kind == "auto" and "stlpips" not in _warned:
            _warned.add("stlpips")
            warnings.warn(
                f"LPIPS backbone weights are not available offline ({backbone_file(net)} is "
                "missing): using the documented substitute ST-LPIPS (shift-tolerant LPIPS, full "
                "weights shipped by stlpips-pytorch); its values are not comparable with "
                "published LPIPS numbers. Set CART_ONLINE=1 once online to get the real LPIPS.",
                stacklevel=2,
            )
        model, name = _stlpips(net), f"stlpips-{net}"
    out = PerceptualDistance(model, name, check_range=check_range)
    return out.to(device) if device is not None else out
