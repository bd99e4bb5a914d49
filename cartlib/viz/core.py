"""The one way notebooks show a figure, and the registry that saves them all at the end.

Builders in :mod:`cartlib.viz` (named ``*_figure``) return a :class:`~matplotlib.figure.Figure`
and remember it; a notebook displays it with :func:`show` (which also names it, and remembers
figures made with plain ``plt.subplots``). :func:`save_open_figures` then writes every remembered
figure into the run directory — Jupyter's inline backend closes figures after each cell, so
"open figures" alone would miss them.

Figures are rendered at :data:`FIGURE_DPI` (150) and shown at their own size (the PNG carries
its display width, as a "retina" figure does), in :func:`show` and for a plain ``plt.show()`` alike
(:func:`sharp_figures`): faint detail (the amplified detail rows, attention maps) survives
zooming in and the published copies. A figure of colour photographs only (:func:`photo_like`)
is marked so that the published copy may store it as a JPEG when its PNG is large
(:func:`cartlib.series.shrink_outputs`); everything else stays PNG.
"""

from __future__ import annotations

import base64
import functools
import io
import re
import struct
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from cartlib.io import paper_path, resolve_run_dir

PAPER_DPI = 300  # the paper-item copies (save_paper_figure)
FIGURE_DPI = 150  # notebooks' figures: pixels per inch rendered; shown at the figure's own size
PANEL_NOTE = "a live panel: run the notebook in JupyterLab to use it"
_FIGURES: list = []  # figures made or shown since the last save_open_figures
_FILE_BACKENDS = {"agg", "cairo", "pdf", "pgf", "ps", "svg", "template"}  # nothing to show on


def register(fig):
    """Remember ``fig`` for :func:`save_open_figures` (once); returns it."""
    if fig not in _FIGURES:
        _FIGURES.append(fig)
    sharp_figures()
    return fig


def figure_png(fig, dpi: int = FIGURE_DPI) -> tuple[bytes, dict]:
    """``fig`` as PNG bytes at ``dpi`` and the display metadata that shows it at the figure's
    own size (``fig.dpi`` pixels per inch on screen): ``width``, ``height`` and, for a figure of
    photographs only, ``photo: True`` (see :func:`photo_like`)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    data = buf.getvalue()
    width, height = struct.unpack(">II", data[16:24])  # the PNG's IHDR chunk
    scale = fig.dpi / dpi
    meta = {"width": round(width * scale), "height": round(height * scale)}
    if photo_like(fig):
        meta["photo"] = True
    return data, meta


def photo_like(fig) -> bool:
    """Whether ``fig`` is a grid of colour photographs or samples only (4 or more RGB images,
    no signed or colour-mapped panel, no amplified detail row): the one kind of figure a JPEG
    may store. Detail strips (``fig.detail_gain``), decompositions, attention maps, plots: no."""
    images = [im for ax in fig.axes for im in ax.get_images()]
    return (
        len(images) >= 4
        and getattr(fig, "detail_gain", None) is None
        and all(np.ndim(im.get_array()) == 3 for im in images)
    )


def sharp_figures() -> None:
    """In an IPython kernel, display matplotlib figures through :func:`figure_png` (150 dpi,
    shown at their own size). Set again whenever a figure is registered or shown: matplotlib's
    inline backend installs its own PNG formatter when it starts, after cartlib is imported."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None or not hasattr(shell, "display_formatter"):
        return
    formatter = shell.display_formatter.formatters["image/png"]
    if formatter.lookup_by_type(Figure) is not figure_png:
        formatter.for_type(Figure, figure_png)


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


def compare(*values: float, decimals: int = 2) -> str:
    """``values`` in order, joined by the relation each neighbouring pair really has:
    ``compare(0.385, 0.474, 0.473, decimals=3)`` -> ``"0.385 < 0.474 > 0.473"`` (``=`` where
    equal). Each number has ``decimals`` decimals, or as many more as tell two unequal
    neighbours apart, so a printed comparison is never false as printed. For lines a notebook
    prints (``print("TV per level:", viz.core.compare(*tv, decimals=1))``) instead of joining
    numbers with a fixed ``" > "``."""
    vals = [float(v) for v in values]
    pairs = list(zip(vals, vals[1:]))
    while decimals < 15 and any(
        a != b and f"{a:.{decimals}f}" == f"{b:.{decimals}f}" for a, b in pairs
    ):
        decimals += 1
    text = f"{vals[0]:.{decimals}f}" if vals else ""
    for a, b in pairs:
        text += f" {'<' if a < b else '>' if a > b else '='} {b:.{decimals}f}"
    return text


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
        fig.savefig(paths[-1], dpi=FIGURE_DPI, bbox_inches="tight")
        plt.close(fig)
    return paths


def save_paper_figure(run_dir, item: str, fig, model: str) -> Path:
    """Save ``fig`` as the paper's ``item`` (``"fig3"``, ``"fig5"``, ``"fig10"``) drawn with the
    run ``model`` (its config's name): :func:`cartlib.io.paper_path`'s ``.png``, at the dpi a
    printed figure needs (300), so a full-scale run's figures sit under the paper's item names
    next to its ``results.json``. -> the path"""
    if not item.startswith("fig"):
        raise ValueError(f"item={item!r}: name the paper's figure, e.g. 'fig3'")
    path = paper_path(run_dir, item, model, ".png")
    fig.savefig(path, dpi=PAPER_DPI, bbox_inches="tight")
    return path


def figure_panel(draw, **controls):
    """A live panel: ``controls`` (ipywidgets, e.g. sliders) above an image of ``draw(**values)``,
    a function returning a matplotlib Figure, redrawn whenever a control changes.

    The controls sit in a row that wraps (each keeps its width, sliders a usable track, labels
    whole), so the panel works in a narrow window. The figure is shown as PNG bytes in an
    ``ipywidgets.Image`` rather than through ``interact``'s Output widget: executing ``interact``
    headless (papermill/nbclient) can deadlock under load (jupyter/nbconvert#1921,
    nteract/papermill#723), an Image widget is a plain state update. Displayed, the panel also
    offers its first image as a plain PNG (with :data:`PANEL_NOTE` as its text), which a page
    without a kernel shows (``series.publish_outputs`` keeps only that in published copies).
    """
    import ipywidgets as widgets

    image = widgets.Image(format="png")
    first: dict = {}

    def render(_=None):
        fig = draw(**{name: c.value for name, c in controls.items()})
        data, meta = figure_png(fig)
        plt.close(fig)
        if fig in _FIGURES:
            _FIGURES.remove(fig)
        image.value, image.width = data, str(meta["width"])
        first.setdefault("png", (data, {"width": meta["width"], "height": meta["height"]}))

    for c in controls.values():
        _fit_control(c)
        c.observe(render, names="value")
    render()
    row = widgets.HBox(list(controls.values()), layout=widgets.Layout(flex_flow="row wrap"))
    return _panel_class()([row, image], static=first["png"])


def _fit_control(control) -> None:
    """Give a control a fixed width that the wrapping row keeps (no shrinking to a 0-px slider
    track) and a label as wide as its text."""
    slider = hasattr(control, "readout")
    if control.layout.width is None:
        control.layout.width = "340px" if slider else "260px"
    control.layout.flex = "0 0 auto"
    control.layout.margin = "2px 12px 2px 0"
    if hasattr(control.style, "description_width"):
        control.style.description_width = "initial"


@functools.cache
def _panel_class():
    import ipywidgets as widgets

    class Panel(widgets.VBox):
        """A VBox whose display also carries its first image as a PNG (for pages that cannot
        show a widget) and a one-line note instead of the widget's repr."""

        def __init__(self, children, static):
            super().__init__(children)
            self._static = static

        def _repr_mimebundle_(self, **kwargs):
            data = super()._repr_mimebundle_(**kwargs) or {}
            png, meta = self._static
            data.update({"text/plain": PANEL_NOTE, "image/png": base64.b64encode(png).decode()})
            return data, {"image/png": meta}

    return Panel
