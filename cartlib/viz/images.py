"""Image figures: grids, side-by-side rows, the step-by-step strips of Figures 1 and 2(a), token
maps, and the base-detail hierarchy of Figure 4.

Images are torch tensors (C, H, W) / (N, C, H, W) in [0, 1], C = 1 or 3. Every builder returns a
registered :class:`~matplotlib.figure.Figure`; notebooks display it with :func:`cartlib.viz.show`.
"""

from __future__ import annotations

import math
import textwrap

import matplotlib.pyplot as plt
import numpy as np
import torch

from cartlib.viz.core import bare, frame, register, show, to_image


def image_grid_figure(
    images: torch.Tensor,
    nrow: int = 8,
    title: str | None = None,
    col_labels: list[str] | None = None,
    row_labels: list[str] | None = None,
    size: float = 1.6,
):
    """A grid of images (N, C, H, W) in [0, 1], ``nrow`` per row (in reading order)."""
    n = len(images)
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    fig, axes = plt.subplots(
        rows, ncol, figsize=(size * ncol, size * rows), squeeze=False, layout="constrained"
    )
    for k, ax in enumerate(axes.flat):
        bare(ax)
        if k < n:
            ax.imshow(to_image(images[k]), cmap="gray", vmin=0, vmax=1)
    for j, label in enumerate(col_labels or []):
        axes[0, j].set_title(label, fontsize=9)
    for i, label in enumerate(row_labels or []):
        axes[i, 0].set_ylabel(_fit_label(label, size, 9), fontsize=9)
    if title:
        fig.suptitle(title)
    return register(fig)


def _fit_label(label: str, size: float, fontsize: float) -> str:
    """A row label broken into lines no longer than a row is high (size inches; a character is
    about 0.6 x the font size wide), so rotated labels of neighbouring rows do not overlap."""
    width = max(4, int(size * 72 / (0.6 * fontsize)))
    lines = label.split("\n")
    return "\n".join(textwrap.fill(line, width, break_on_hyphens=False) for line in lines)


def step_labels(schedule) -> list[str]:
    """Column labels of a schedule's steps: ``base 4x4`` and ``D3`` where the schedule has a
    base/detail split (CART), ``scale 4x4`` where it has none (order 0, VAR: its maps are scales
    of the image itself, not of a base)."""
    if schedule.n_factors:
        return [s.label for s in schedule]
    return [f"scale {s.h}x{s.w}" for s in schedule]


def show_grid(images: torch.Tensor, nrow: int = 8, title: str | None = None, **kwargs) -> None:
    """``show(image_grid_figure(...), title)`` in one call (notebook 02 uses it)."""
    show(image_grid_figure(images, nrow, title, **kwargs), title or "grid")


def show_steps(steps: torch.Tensor, labels: list[str], title: str | None = None, **kwargs) -> None:
    """``show(steps_figure(...), title)`` in one call."""
    show(steps_figure(steps, labels, title, **kwargs), title or "steps")


def show_token_maps(tokens: list[torch.Tensor], labels: list[str], vocab: int) -> None:
    """``show(token_maps_figure(...), "token maps")`` in one call."""
    show(token_maps_figure(tokens, labels, vocab), "token maps")


def compare_figure(images: list[torch.Tensor], titles: list[str], title=None, size=2.6):
    """One row of images (C, H, W) side by side with titles (e.g. a base beside low-passes)."""
    fig, axes = plt.subplots(
        1, len(images), figsize=(size * len(images), size + 0.3), layout="constrained"
    )
    for ax, img, label in zip(np.atleast_1d(axes), images, titles, strict=True):
        ax.imshow(to_image(img), cmap="gray", vmin=0, vmax=1)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return register(fig)


def steps_figure(
    steps: torch.Tensor,
    labels: list[str],
    title: str | None = None,
    highlight: int | None = None,
    size: float = 1.2,
    details_from: int | None = None,
    gain: float | None = None,
):
    """Decoded images after every generation/tokenization step, (M, B, C, H, W): one row per
    image, one column per step (Figure 1's top row, Figure 2(a)); ``highlight`` frames one column
    in orange (the generated base, as the paper's orange box).

    ``details_from`` = m0 (the first detail step, ``schedule.n_base``) adds beneath each image's
    row what every step m >= m0 added, step m minus step m - 1, amplified: shown as
    0.5 + gain x difference (mid-grey = no change), one gain for the whole figure, by default
    :func:`detail_gain` of the shown differences. The gain is written in the row ("details x12")
    and the title, and kept as ``fig.detail_gain``: details too faint to see in the decoded row
    show there.
    """
    m, b = steps.shape[:2]
    rows = 1 if details_from is None else 2
    fig, axes = plt.subplots(
        b * rows, m, figsize=(size * m, size * b * rows + 0.4), squeeze=False, layout="constrained"
    )
    for i in range(b):
        for k in range(m):
            ax = axes[rows * i, k]
            ax.imshow(to_image(steps[k, i]), cmap="gray", vmin=0, vmax=1)
            bare(ax)
            if i == 0:
                ax.set_title(labels[k], fontsize=8)
            if k == highlight:
                frame(ax)
    if details_from is not None:
        gain = _added_rows(axes, steps, details_from, gain)
        fig.detail_gain = gain
        note = f"details x{gain:g}: 0.5 + {gain:g} x (step m - step m-1)"
        title = f"{title}\n{note}" if title else note
    if title:
        fig.suptitle(title)
    return register(fig)


def detail_gain(added: torch.Tensor, q: float = 0.99, target: float = 0.4) -> float:
    """The gain that maps the ``q``-quantile of |added| to ``target``: shown as 0.5 + gain x added,
    all but the largest 1 % of the changes stay inside [0.1, 0.9]. Rounded to two significant
    digits, so the label states exactly the gain drawn; 1 when nothing changed."""
    a = added.detach().float().abs().flatten().cpu()
    a = a[:: max(1, len(a) // 1_000_000)]  # torch.quantile takes at most 16M values
    top = torch.quantile(a, q).item() if len(a) else 0.0
    return float(f"{target / top:.2g}") if top > 0 else 1.0


def _added_rows(axes, steps: torch.Tensor, start: int, gain: float | None) -> float:
    """Draw 0.5 + gain x (step k - step k-1) for k >= start in every second row; -> the gain."""
    m, b = steps.shape[:2]
    if isinstance(start, bool) or not isinstance(start, int) or not 1 <= start < m:
        raise ValueError(
            f"details_from={start!r} must be a step index in 1..{m - 1} (the first step whose "
            "change is shown, e.g. schedule.n_base)"
        )
    added = steps[start:] - steps[start - 1 : -1]  # (M - start, B, C, H, W): what step k added
    gain = detail_gain(added) if gain is None else gain
    for i in range(b):
        row = axes[2 * i + 1]
        for k in range(m):
            bare(row[k])
            if k >= start:
                shown = 0.5 + gain * added[k - start, i]
                row[k].imshow(to_image(shown), cmap="gray", vmin=0, vmax=1)
        label = f"details\nx{gain:g}"
        ax = row[start - 1]
        ax.text(0.5, 0.5, label, ha="center", va="center", fontsize=8, transform=ax.transAxes)
    return gain


def token_maps_figure(tokens: list[torch.Tensor], labels: list[str], vocab: int):
    """The token maps r_1..r_M (each (B, h_m, w_m)) of the first image of a batch, each on its
    own grid; colour = code index in [0, vocab)."""
    fig, axes = plt.subplots(
        1, len(tokens), figsize=(1.2 * len(tokens), 1.6), squeeze=False, layout="constrained"
    )
    for ax, r, label in zip(axes[0], tokens, labels, strict=True):
        ax.imshow(
            r[0].cpu().numpy(),
            cmap="nipy_spectral",
            vmin=0,
            vmax=vocab - 1,
            interpolation="nearest",
        )
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    fig.suptitle("token maps (colour = code index)")
    return register(fig)


# ------------------------------------------------------------------------- Figure 4 (notebook 01)
def _detail_scale(details: list[torch.Tensor], q: float = 0.995) -> float:
    """The symmetric colour limit for signed detail images: the q-quantile of |D| over all
    levels (the max would let a few edge pixels wash out the rest)."""
    if not details:
        return 1.0
    a = torch.cat([d.detach().float().abs().flatten() for d in details]).cpu()
    a = a[:: max(1, len(a) // 1_000_000)]  # torch.quantile takes at most 16M values
    return max(torch.quantile(a, q).item(), 1e-6)


def decomposition_figure(image, dec, index=0, titles=True, size=2.0, detail_scale=None):
    """The paper's Figure 4 for one image: I, B_n, D_n, ..., D_1 and the edge map s_n.

    ``dec`` is a :class:`~cartlib.decompose.Decomposition` of a batch that holds ``image``
    (row ``index``). Details are signed: they are shown as the mean over channels on a diverging
    colour map with one symmetric scale for all levels (+-``detail_scale``, default the 99.5th
    percentile of |D|), so the levels compare; the colour bar gives the scale.
    """
    fig, axes = plt.subplots(
        1, 3 + dec.order, figsize=(size * (3 + dec.order) + 0.6, size), layout="constrained"
    )
    _decomposition_row(axes, image, dec, index, titles, detail_scale)
    return register(fig)


def decomposition_rows_figure(images, dec, size=1.8, detail_scale=None, title=None):
    """:func:`decomposition_figure` for every image of a batch, one row each."""
    n, cols = len(images), 3 + dec.order
    fig, axes = plt.subplots(
        n, cols, figsize=(size * cols + 0.6, size * n), squeeze=False, layout="constrained"
    )
    scale = detail_scale or _detail_scale(dec.details)
    for i in range(n):
        _decomposition_row(axes[i], images[i], dec, i, i == 0, scale)
    if title:
        fig.suptitle(title)
    return register(fig)


def _decomposition_row(axes, image, dec, index, titles, detail_scale):
    n = dec.order
    details = [d[index] for d in dec.details]
    scale = detail_scale or _detail_scale(details)
    panels = [(to_image(image), f"I ({image.shape[-1]} px)", {"cmap": "gray"})]
    panels.append((to_image(dec.base[index]), f"B_{n}" if n else "B_0 = I", {"cmap": "gray"}))
    for k in range(n, 0, -1):
        d = details[k - 1].mean(0).cpu().numpy()  # (H, W), signed
        panels.append((d, f"D_{k}", {"cmap": "RdBu_r", "vmin": -scale, "vmax": scale}))
    if n:
        s = dec.edges[-1][index, 0].cpu().numpy()
        panels.append((s, f"s_{n} (edges of B_{n})", {"cmap": "gray", "vmin": 0, "vmax": 1}))
    for ax in axes:
        ax.axis("off")
    shown = [ax.imshow(a, **kw) for ax, (a, _, kw) in zip(axes, panels, strict=False)]
    if titles:
        for ax, (_, label, _) in zip(axes, panels, strict=False):
            ax.set_title(label, fontsize=9)
    if n:  # one colour bar for the details (panels 2 .. n+1 share the symmetric scale)
        plt.colorbar(shown[2], ax=list(axes), shrink=0.8, pad=0.01, label="detail (mean of C)")
