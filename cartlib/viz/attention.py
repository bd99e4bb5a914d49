"""Attention figures (notebook 07): the paper's Figure 10 — intermediate images above the
attention of one query token, per step, for each model — and the per-step attention profile
(how far tokens look, and how much of their attention stays on their own token map)."""

from __future__ import annotations

import matplotlib.pyplot as plt

from cartlib.viz.core import bare, frame, register, to_image
from cartlib.viz.images import step_labels

MODEL_COLORS = {"CART": "goldenrod", "VAR": "tab:red"}


def figure10(records: dict[str, dict], size: float = 1.3):
    """Figure 10: for each model two rows — the image decoded after every step (the generated
    base framed in yellow, as in the paper) and where one query token of that step looks: its
    attention over all earlier-or-same-step keys, spread onto the full latent grid (a cyan cross
    marks the query).

    ``records[name]``: ``steps`` (M, C, H, W) in [0, 1], ``heat`` (M of (h_M, w_M)), ``query``
    (M, 2) query centres in [0, 1) grid coordinates, ``schedule`` the model's TokenSchedule.
    Each attention map is shown divided by its own maximum (written above it; a query of an
    early step spreads over few keys, of a late step over thousands), one colour bar per model."""
    cols = max(len(r["heat"]) for r in records.values())
    fig, axes = plt.subplots(
        2 * len(records),
        cols,
        figsize=(size * cols, 2.1 * size * len(records)),
        squeeze=False,
        layout="constrained",
    )
    for row, (name, r) in enumerate(records.items()):
        sched = r["schedule"]
        names = step_labels(sched)
        for m in range(cols):
            image_ax, heat_ax = axes[2 * row, m], axes[2 * row + 1, m]
            bare(image_ax)
            bare(heat_ax)
            if m >= len(r["heat"]):
                continue
            image_ax.imshow(to_image(r["steps"][m]), cmap="gray", vmin=0, vmax=1)
            image_ax.set_title(names[m], fontsize=7)
            heat = r["heat"][m].cpu().numpy()  # (h_M, w_M)
            top = float(heat.max())
            shown = heat_ax.imshow(heat / (top or 1.0), cmap="magma", vmin=0, vmax=1)
            heat_ax.set_title(f"max {top:.2g}", fontsize=6)
            y, x = r["query"][m].tolist()
            heat_ax.plot(x * heat.shape[1] - 0.5, y * heat.shape[0] - 0.5, "+", c="cyan", ms=6)
            if sched.n_factors and m == sched.n_base - 1:
                frame(image_ax, "gold")
        axes[2 * row, 0].set_ylabel(f"{name}\nimage", fontsize=8)
        axes[2 * row + 1, 0].set_ylabel(f"{name}\nattention", fontsize=8)
        bar = fig.colorbar(shown, ax=list(axes[2 * row + 1]), fraction=0.02, pad=0.01)
        bar.set_label("÷ the map's max", fontsize=6)
        bar.ax.tick_params(labelsize=6)
    fig.suptitle("Figure 10: intermediate images and attention of one query per step")
    return register(fig)


def attention_profile_figure(profiles: dict[str, dict[str, list[float]]], schedules: dict):
    """Per step and model: the attention distance (mean query-key distance weighted by
    attention, in image sides) and the share of attention on the step's own token map, each with
    what uniform attention over the allowed keys would give (dashed; the distance's when the
    profile holds ``uniform_distance``). Detail steps are shaded."""
    fig, (dist_ax, share_ax) = plt.subplots(1, 2, figsize=(10, 3.2), layout="constrained")
    for name, prof in profiles.items():
        sched, color = schedules[name], MODEL_COLORS.get(name)
        steps = range(1, len(prof["distance"]) + 1)
        dist_ax.plot(steps, prof["distance"], "o-", color=color, label=name)
        if "uniform_distance" in prof:
            uniform = prof["uniform_distance"]
            dist_ax.plot(steps, uniform, "--", color=color, lw=1, label=f"{name}, uniform")
        share_ax.plot(steps, prof["self_share"], "o-", color=color, label=name)
        share_ax.plot(
            steps, prof["uniform_share"], "--", color=color, lw=1, label=f"{name}, uniform"
        )
        if sched.n_factors:
            for ax in (dist_ax, share_ax):
                ax.axvspan(sched.n_base + 0.5, sched.n_steps + 0.5, color=color, alpha=0.12)
    dist_ax.set(xlabel="step m", ylabel="attention distance (image sides)")
    dist_ax.set_title("how far a step's tokens look", fontsize=10)
    share_ax.set(xlabel="step m", ylabel="attention on own map", ylim=(0, 1.05))
    share_ax.set_title("own map vs. earlier maps (shaded: CART's detail steps)", fontsize=10)
    for ax in (dist_ax, share_ax):
        ax.legend(fontsize=8)
    return register(fig)


def query_attention_figure(image, heat, query, title: str, heat_title: str):
    """One query's attention beside the image it is generating (notebook 07's live panel):
    ``image`` (C, H, W) in [0, 1], ``heat`` (h_M, w_M) the query's attention spread over the
    latent grid (summing to 1, :func:`cartlib.model.attention.attention_heatmap`), ``query``
    (y, x) its centre in [0, 1) grid coordinates. The heat map's colour bar is in shares of the
    query's attention."""
    fig, (image_ax, heat_ax) = plt.subplots(1, 2, figsize=(6.2, 2.8), layout="constrained")
    image_ax.imshow(to_image(image), cmap="gray", vmin=0, vmax=1)
    image_ax.set_title(title, fontsize=8)
    heat = heat.cpu().numpy()
    shown = heat_ax.imshow(heat, cmap="magma", vmin=0)
    y, x = query
    heat_ax.plot(x * heat.shape[1] - 0.5, y * heat.shape[0] - 0.5, "+", c="cyan", ms=9)
    heat_ax.set_title(heat_title, fontsize=8)
    fig.colorbar(shown, ax=heat_ax, fraction=0.046).set_label("share of attention", fontsize=7)
    bare(image_ax)
    bare(heat_ax)
    return register(fig)
