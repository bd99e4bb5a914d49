"""Figure helpers shared by the notebooks (matplotlib only).

Images are torch tensors (C, H, W) / (N, C, H, W) in [0, 1], C = 1 or 3. Functions named
``*_figure`` build and return a :class:`~matplotlib.figure.Figure`; ``show_*`` build one and
display it. Every figure made here is remembered, so :func:`save_open_figures` can write them all
into the run directory at the end of a notebook (Jupyter's inline backend closes figures after
each cell, so "open figures" alone would miss them).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch

from cartlib.io import resolve_run_dir

_FIGURES: list = []  # figures made by this module since the last save_open_figures


def _register(fig):
    _FIGURES.append(fig)
    return fig


def _show(fig) -> None:
    if "agg" not in matplotlib.get_backend().lower():  # Agg (tests, scripts) cannot show
        plt.show()


def to_image(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) tensor in [0, 1] -> (H, W, C) float numpy array for imshow (clipped; grey 2-D)."""
    a = x.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
    return a[..., 0] if a.shape[-1] == 1 else a


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
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
        if k < n:
            ax.imshow(to_image(images[k]), cmap="gray", vmin=0, vmax=1)
    for j, label in enumerate(col_labels or []):
        axes[0, j].set_title(label, fontsize=9)
    for i, label in enumerate(row_labels or []):
        axes[i, 0].set_ylabel(label, fontsize=9)
    if title:
        fig.suptitle(title)
    return _register(fig)


def show_grid(images: torch.Tensor, nrow: int = 8, title: str | None = None, **kwargs) -> None:
    """Display :func:`image_grid_figure`."""
    _show(image_grid_figure(images, nrow, title, **kwargs))


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
    return _register(fig)


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
    return _register(fig)


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


def show_decomposition(image, dec, index=0, **kwargs) -> None:
    """Display :func:`decomposition_figure`."""
    _show(decomposition_figure(image, dec, index, **kwargs))


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
    return _register(fig)


def save_open_figures(run_dir, prefix: str) -> list[Path]:
    """Save every figure made by this module (and any still-open pyplot figure) since the last
    call as ``<run_dir>/figures/<prefix>_<nn>_<title>.png``, then close them; returns the paths."""
    figs = list(_FIGURES)
    figs += [f for f in map(plt.figure, plt.get_fignums()) if f not in figs]
    _FIGURES.clear()
    out = resolve_run_dir(run_dir) / "figures"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, fig in enumerate(figs):
        label = getattr(fig, "cartlib_name", None) or (
            fig._suptitle.get_text() if fig._suptitle else ""
        )
        slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:40] or "figure"
        paths.append(out / f"{prefix}_{i:02d}_{slug}.png")
        fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
        plt.close(fig)
    return paths


def figure_panel(draw, **controls):
    """A live panel: ``controls`` (ipywidgets, e.g. sliders) above an image of ``draw(**values)``,
    a function returning a matplotlib Figure, redrawn whenever a control changes.

    The figure is shown as PNG bytes in an ``ipywidgets.Image`` rather than through ``interact``'s
    Output widget: executing ``interact`` headless (papermill/nbclient) can deadlock under load
    (jupyter/nbconvert#1921, nteract/papermill#723), an Image widget is a plain state update.
    """
    import io

    import ipywidgets as widgets

    image = widgets.Image(format="png")

    def render(_=None):
        fig = draw(**{name: c.value for name, c in controls.items()})
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        if fig in _FIGURES:
            _FIGURES.remove(fig)
        image.value = buf.getvalue()

    for c in controls.values():
        c.observe(render, names="value")
    render()
    return widgets.VBox([widgets.HBox(list(controls.values())), image])


def show(fig=None, name: str | None = None) -> None:
    """Display a figure made in a notebook and remember it for :func:`save_open_figures`
    (``name`` becomes its file name)."""
    fig = fig or plt.gcf()
    if name:
        fig.cartlib_name = name
    _show(fig if fig in _FIGURES else _register(fig))  # *_figure helpers registered it already


def show_steps(
    steps: torch.Tensor,
    labels: list[str],
    title: str | None = None,
    highlight: int | None = None,
    size: float = 1.2,
) -> None:
    """Decoded images after every generation/tokenization step, (M, B, 3, H, W): one row per
    image, one column per step; ``highlight`` frames one column (e.g. the generated base)."""
    m, b = steps.shape[:2]
    fig, axes = plt.subplots(
        b, m, figsize=(size * m, size * b + 0.4), squeeze=False, layout="constrained"
    )
    for i in range(b):
        for k in range(m):
            ax = axes[i, k]
            ax.imshow(to_image(steps[k, i]), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(labels[k], fontsize=8)
            if k == highlight:
                for spine in ax.spines.values():
                    spine.set_edgecolor("orange")
                    spine.set_linewidth(3)
    if title:
        fig.suptitle(title)
    _show(_register(fig))


def show_token_maps(tokens: list[torch.Tensor], labels: list[str], vocab: int) -> None:
    """The token maps r_1..r_M of the first image of a batch; colour = code index."""
    fig, axes = plt.subplots(
        1, len(tokens), figsize=(1.2 * len(tokens), 1.6), squeeze=False, layout="constrained"
    )
    for ax, r, label in zip(axes[0], tokens, labels, strict=True):
        ax.imshow(r[0].cpu(), cmap="nipy_spectral", vmin=0, vmax=vocab - 1, interpolation="nearest")
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    fig.suptitle("token maps (colour = code index)")
    _show(_register(fig))


def plot_history(history: list[dict], keys: list[str], title: str | None = None, smooth=10):
    """Training curves of those ``keys`` present in ``history`` (raw and a moving average)."""
    keys = [k for k in keys if any(k in h for h in history)]
    fig, axes = plt.subplots(
        1, len(keys), figsize=(3.2 * len(keys), 2.6), squeeze=False, layout="constrained"
    )
    for ax, key in zip(axes[0], keys, strict=True):
        steps, values = np.array([(h["step"], h[key]) for h in history if key in h]).T
        ax.plot(steps, values, alpha=0.35, lw=0.8)
        if len(values) > smooth:
            ax.plot(steps[smooth - 1 :], np.convolve(values, np.ones(smooth) / smooth, "valid"))
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
    if title:
        fig.suptitle(title)
    _show(_register(fig))
