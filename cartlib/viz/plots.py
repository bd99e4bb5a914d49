"""Curves and bars: training histories, the per-step loss of the next-detail transformer (Eq. 9),
the paper's Figure 11 (reconstruction MSE against quantization depth) and Table 5 (FID against
decomposition order). Every builder returns a registered figure for :func:`cartlib.viz.show`."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from cartlib.viz.core import register, show

# the paper's colours in Figure 11 (vanilla blue, multi-scale red, base-detail yellow)
TOKENIZER_COLORS = {
    "vanilla": "tab:blue",
    "multiscale": "tab:red",
    "base_detail": "goldenrod",
    "base_detail+carry": "tab:green",
}
KIND_COLORS = {"base": "tab:blue", "detail": "goldenrod"}
# CART-d30, ImageNet 256, paper's Table 5; orders 0 and 3 equal Table 1's rejection-sampled rows
# (VAR-d30-re 1.70, CART-d30-re 1.57), so the table is read as rejection-sampled ("-re")
TABLE5_FID = {0: 1.70, 1: 1.65, 2: 1.62, 3: 1.57, 4: 1.60}


# what a logged number is, for the y axis of its training curve
Y_LABELS = {
    "loss": "loss (nats per token)", "acc": "token accuracy", "rec": "reconstruction MSE",
    "vq": "VQ + commitment loss", "lpips": "perceptual distance", "base": "base MSE",
    "gan_g": "generator hinge loss", "gan_d": "discriminator hinge loss",
    "used_codes": "codes used", "restarted": "codes restarted", "grad_norm": "gradient norm",
}  # fmt: skip


def history_figure(
    history: list[dict],
    keys: list[str],
    title: str | None = None,
    smooth=10,
    reference: dict[str, tuple[float, str]] | None = None,
    y_labels: dict[str, str] | None = None,
):
    """Training curves of those ``keys`` present in ``history`` (raw and a moving average);
    ``reference[key] = (value, label)`` draws a labelled horizontal line on that key's panel
    (e.g. ln V on a cross-entropy: the loss of a uniform guess). The y axes say what each number
    is (:data:`Y_LABELS`, the transformer's); ``y_labels`` names a key otherwise — the tokenizer's
    ``loss`` is Eq. 2's weighted sum, not a cross-entropy."""
    keys = [k for k in keys if any(k in h for h in history)]
    names = {**Y_LABELS, **(y_labels or {})}
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
        ax.set_ylabel(names.get(key, key), fontsize=8)
        if reference and key in reference:
            value, label = reference[key]
            ax.axhline(value, color="grey", ls=":", lw=1, label=label)
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return register(fig)


def plot_history(
    history: list[dict],
    keys: list[str],
    title: str | None = None,
    smooth=10,
    y_labels: dict[str, str] | None = None,
):
    """``show(history_figure(...), title)`` in one call (notebook 02 uses it)."""
    show(history_figure(history, keys, title, smooth, y_labels=y_labels), title or "history")


def step_bars_figure(schedule, panels: dict[str, list[float]], title: str | None = None):
    """One bar per token map r_1..r_M for each entry of ``panels`` (e.g. cross-entropy and
    accuracy per step), coloured by the step's kind (base scale or detail), with each kind's
    mean as a dashed line: how predictable each map is."""
    labels = [s.label for s in schedule]
    kinds = [s.kind for s in schedule]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5 * len(panels), 3), squeeze=False, layout="constrained"
    )
    for ax, (name, values) in zip(axes[0], panels.items(), strict=True):
        ax.bar(labels, values, color=[KIND_COLORS[k] for k in kinds])
        for kind in dict.fromkeys(kinds):
            vals = [v for v, k in zip(values, kinds, strict=True) if k == kind]
            ax.axhline(np.mean(vals), color=KIND_COLORS[kind], ls="--", lw=1, label=f"{kind} mean")
        ax.set_title(name, fontsize=10)
        ax.tick_params(axis="x", rotation=60)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return register(fig)


def figure11(
    mse_per_depth: dict[str, list[float]],
    n_base: int | None = None,
    title=None,
    tokens_per_depth: dict[str, list[int]] | None = None,
):
    """The paper's Figure 11: reconstruction MSE of the image decoded from the first k token
    maps, k = 1..M, one line per tokenizer (log scale); a dotted line after the ``n_base``-th map
    marks where base-detail tokenizers switch from base scales to details. With
    ``tokens_per_depth`` (each tokenizer's tokens per map) a second panel plots the same MSE
    against the tokens used so far: a vanilla VQ-VAE's first map costs all h x w tokens, a
    multi-scale one's first a single token, which the depth axis hides."""
    panels = 2 if tokens_per_depth else 1
    fig, axes = plt.subplots(
        1, panels, figsize=(6 * panels, 4), layout="constrained", squeeze=False
    )
    ax = axes[0, 0]
    for name, mse in mse_per_depth.items():
        depth = range(1, len(mse) + 1)
        ax.plot(depth, mse, "o-", color=TOKENIZER_COLORS.get(name), label=name)
    if n_base:
        ax.axvline(n_base + 0.5, color="gray", ls=":", lw=1, label="base | details")
    ax.set(
        xlabel="quantization depth k (token maps used)",
        ylabel="reconstruction MSE",
        yscale="log",
        title=title or "Figure 11: reconstruction MSE vs. depth",
    )
    ax.legend(fontsize=8)
    if tokens_per_depth:
        ax = axes[0, 1]
        for name, mse in mse_per_depth.items():
            used = np.cumsum(tokens_per_depth[name][: len(mse)])
            ax.plot(used, mse, "o-", color=TOKENIZER_COLORS.get(name), label=name)
        ax.set(xlabel="tokens used (cumulative)", ylabel="reconstruction MSE", xscale="log",
               yscale="log", title="the same, against the tokens it costs")  # fmt: skip
    return register(fig)


def table5_figure(
    fids: dict[int, list[float] | list[list[float]]],
    extra: dict[str, list[float] | list[list[float]]] | None = None,
    label="",
):
    """Table 5 as a plot: FID against decomposition order n (0 = VAR) for this run beside the
    paper's CART-d30 values. Each value of ``fids`` (and of ``extra``, variants such as Table 4's
    flat base, drawn as single points at the right of this run's panel) holds FIDs over sampling
    seeds, or a training seeds × sampling seeds array: the line is the mean ± std over all of them,
    and with more than one training seed each seed's mean over sampling seeds is a hollow dot, so
    the plot shows how far a second training run moves a variant."""
    fig, (ours, paper) = plt.subplots(1, 2, figsize=(9, 3.4), layout="constrained")
    orders = sorted(fids)
    ours.errorbar(
        orders,
        [np.mean(fids[n]) for n in orders],
        yerr=[np.std(fids[n]) for n in orders],
        fmt="o-",
        capsize=4,
        label="order n",
    )
    points = {n: (n, fids[n]) for n in orders}
    for i, (name, f) in enumerate((extra or {}).items()):
        x = max(orders) + 1 + i
        ours.errorbar([x], [np.mean(f)], yerr=[np.std(f)], fmt="s", capsize=4, label=name)
        points[name] = (x, f)
    label_seeds = "one training seed"
    for x, f in points.values():
        f = np.asarray(f, dtype=float)
        if f.ndim == 2 and len(f) > 1:  # training seeds x sampling seeds
            seed_means = f.mean(axis=1)
            ours.plot(
                [x + 0.12] * len(seed_means),
                seed_means,
                "o",
                mfc="none",
                color="gray",
                ms=4,
                label=label_seeds,
            )
            label_seeds = None
    ours.set(xlabel="decomposition order n (0 = VAR)", ylabel="FID (lower is better)")
    if extra:  # variants are not orders: their own tick labels, right of a dotted line
        ticks = [*orders, *(max(orders) + 1 + i for i in range(len(extra)))]
        names = [name.split(",")[-1].strip() for name in extra]
        ours.set_xticks(ticks, [str(n) for n in orders] + names)
        ours.axvline(max(orders) + 0.5, color="gray", ls=":", lw=1)
    ours.set_title(f"this run {label}".strip(), fontsize=10)
    ours.legend(fontsize=8)
    paper.plot(list(TABLE5_FID), list(TABLE5_FID.values()), "o-", color="gray")
    paper.set(xlabel="decomposition order n (0 = VAR)", ylabel="FID")
    paper.set_title("paper, Table 5 (CART-d30-re, ImageNet 256)", fontsize=10)
    for ax in (paper,) if extra else (ours, paper):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return register(fig)


def mask_figure(schedule, mask, title: str | None = None):
    """The transformer's attention mask (L, L) bool — True where a query token (row) may attend to
    a key token (column) — drawn black on white with the token maps' boundaries and labels: the
    block-causal staircase of next-detail prediction (notebook 04).

    One tick per map. The first base scales are a few tokens wide: where a label would cover the
    one before it, it is set one label length further off the axis on a longer (minor) tick, and
    where that is taken too it is left out and the label before it names the run
    ("base 2x2…6x6")."""
    sizes = np.array([s.h * s.w for s in schedule])
    fig, ax = plt.subplots(figsize=(4.6, 4.6), layout="constrained")
    ax.imshow(np.asarray(mask, dtype=float), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    for edge in sizes.cumsum()[:-1] - 0.5:
        ax.axhline(edge, color="tab:orange", lw=0.5)
        ax.axvline(edge, color="tab:orange", lw=0.5)
    centres = sizes.cumsum() - sizes / 2 - 0.5
    lanes = _label_lanes(centres / sizes.sum())
    labels = _run_labels([s.label for s in schedule], lanes)
    near = [text if lane == 0 else "" for text, lane in zip(labels, lanes, strict=True)]
    far = [(c, text) for c, text, lane in zip(centres, labels, lanes, strict=True) if lane == 1]
    ax.set_xticks(centres, near, rotation=90, fontsize=7)
    ax.set_yticks(centres, near, fontsize=7)
    if far:  # set off the axis by one label length, on long (minor) ticks
        length = 4.2 * max(len(text) for text in near) + 6  # points, at fontsize 7
        for axis in (ax.xaxis, ax.yaxis):  # a minor tick where a major one is: kept, not dropped
            axis.remove_overlapping_locs = False
        ax.set_xticks([c for c, _ in far], [t for _, t in far], minor=True, rotation=90)
        ax.set_yticks([c for c, _ in far], [t for _, t in far], minor=True)
        ax.tick_params(which="minor", length=length, width=0.6, labelsize=7, color="grey")
    ax.set_xlabel("key token (grouped by token map)")
    ax.set_ylabel("query token (grouped by token map)")
    ax.set_title(
        title or f"block-causal mask, {sizes.sum()} tokens\n(black: may attend)", fontsize=9
    )
    return register(fig)


def _label_lanes(positions: np.ndarray, gap: float = 0.045, n_lanes: int = 2) -> list[int]:
    """For tick labels at ``positions`` (fractions of the axis, increasing), the lane each is
    drawn in (0: next to the axis, 1: a label length further out), the first that keeps ``gap``
    (about a 7-point label's height on a 4.6-inch figure) from the label before it in that lane;
    -1 where no lane has room (the label is left out)."""
    last: list[float] = []  # the position of the latest label in each lane
    out = []
    for x in positions:
        lane = next((k for k, y in enumerate(last) if x - y >= gap), len(last))
        if lane >= n_lanes:
            out.append(-1)
            continue
        last[lane : lane + 1] = [x]
        out.append(lane)
    return out


def _run_labels(labels: list[str], lanes: list[int]) -> list[str]:
    """The labels as drawn: "" where left out (lane -1), and the label before a left-out run
    names the run, "base 2x2…6x6"."""
    out = list(labels)
    for i, lane in enumerate(lanes):
        if lane >= 0 and i + 1 < len(lanes) and lanes[i + 1] < 0:
            j = i + 1
            while j + 1 < len(lanes) and lanes[j + 1] < 0:
                j += 1
            out[i] = f"{labels[i]}…{labels[j].split()[-1]}"
        elif lane < 0:
            out[i] = ""
    return out
