"""The one way notebooks show a figure, and the registry that saves them all at the end.

Builders in :mod:`cartlib.viz` (named ``*_figure``) return a :class:`~matplotlib.figure.Figure`
and remember it; a notebook displays it with :func:`show` (which also names it, and remembers
figures made with plain ``plt.subplots``). :func:`save_open_figures` then writes every remembered
figure into the run directory — Jupyter's inline backend closes figures after each cell, so
"open figures" alone would miss them.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch

from cartlib.io import resolve_run_dir

_FIGURES: list = []  # figures made or shown since the last save_open_figures
_FILE_BACKENDS = {"agg", "cairo", "pdf", "pgf", "ps", "svg", "template"}  # nothing to show on


def register(fig):
    """Remember ``fig`` for :func:`save_open_figures` (once); returns it."""
    if fig not in _FIGURES:
        _FIGURES.append(fig)
    return fig


def show(fig, name: str) -> None:
    """Display ``fig`` and remember it as ``name`` (its file name in ``<run_dir>/figures``).

    In Jupyter only this figure is displayed (then closed, so the inline backend does not show it
    a second time); under an interactive backend ``plt.show()``; under a file backend (Agg in
    tests and scripts) nothing."""
    fig.cartlib_name = name
    register(fig)
    backend = matplotlib.get_backend().lower()
    if "inline" in backend:
        from IPython.display import display

        display(fig)
        plt.close(fig)
    elif backend not in _FILE_BACKENDS:
        plt.show()


def to_image(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) tensor in [0, 1] -> (H, W, C) float numpy array for imshow (clipped; grey 2-D)."""
    a = x.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
    return a[..., 0] if a.shape[-1] == 1 else a


def frame(ax, color: str = "orange", width: float = 3) -> None:
    """Draw a coloured frame around one panel (the generated base in Figures 1 and 10)."""
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_edgecolor(color)
        spine.set_linewidth(width)


def bare(ax) -> None:
    """An image panel: no ticks, no frame (a later :func:`frame` can still add one)."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def save_open_figures(run_dir, prefix: str) -> list[Path]:
    """Save every remembered figure (and any still-open pyplot figure) since the last call as
    ``<run_dir>/figures/<prefix>_<nn>_<name>.png``, then close them; returns the paths. The name is
    the one given to :func:`show`, else the figure's suptitle."""
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
