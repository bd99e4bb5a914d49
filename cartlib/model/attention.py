"""Reading attention maps out of the transformer (notebook 07, the paper's Figure 10).

:func:`record_attention` switches the chosen blocks' ``SelfAttention.store_attn`` on and collects
each call's attention probabilities through forward hooks — the model itself computes them, so
there is no second implementation to drift from the real one. In a teacher-forced forward one call
covers the whole sequence (B, heads, L, L); during KV-cached sampling there is one call per step,
(B, heads, h_m w_m, L_{<=m}).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from cartlib.model.transformer import NextDetailTransformer


@contextmanager
def record_attention(
    model: NextDetailTransformer, layers: list[int] | None = None
) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Collect attention maps of ``layers`` (default: all) while the block runs.

    Yields ``{layer: [map per call]}``; maps are (B, heads, queries, keys), rows sum to 1 over
    the keys the mask allows and are exactly 0 on masked keys."""
    layers = list(range(len(model.blocks))) if layers is None else layers
    maps: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    handles = []
    for i in layers:
        attn = model.blocks[i].attn
        attn.store_attn = True
        handles.append(
            attn.register_forward_hook(lambda mod, _in, _out, i=i: maps[i].append(mod.last_attn))
        )
    try:
        yield maps
    finally:
        for i, h in zip(layers, handles):
            h.remove()
            model.blocks[i].attn.store_attn = False
            model.blocks[i].attn.last_attn = None


def attention_distance(attn: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> float:
    """Mean distance (in units of the image side) between a query token and the keys it attends
    to, weighted by attention: small = local attention. attn (B,H,Q,K), q_pos (Q,2), k_pos (K,2)."""
    d = torch.cdist(q_pos.float(), k_pos.float())  # (Q, K)
    return float((attn.float() * d).sum(-1).mean())


def step_attention_profile(maps_per_step: list[torch.Tensor], schedule) -> dict[str, list]:
    """Per generation step m, from one map per cached step (B, heads, h_m w_m, L_{<=m}),
    averaged over images, heads and the step's queries:

    * ``distance``: attention distance of the step's queries (:func:`attention_distance`);
    * ``map_share``: the share of attention on each token map r_1..r_m (a list of m + 1 numbers
      summing to 1) — what Eq. 9's conditioning on r_{<m} is made of;
    * ``self_share``: the share on the step's own map r_m (the last entry of ``map_share``);
    * ``uniform_share``: that share under uniform attention over the allowed keys,
      h_m w_m / L_{<=m} — a self share below it means the step favours earlier maps."""
    pos = schedule.positions()
    out: dict[str, list] = {"distance": [], "map_share": [], "self_share": [], "uniform_share": []}
    for m, a in enumerate(maps_per_step):
        sl = schedule.step_slice(m)
        out["distance"].append(attention_distance(a, pos[sl], pos[: sl.stop]))
        shares = [float(a[..., schedule.step_slice(k)].sum(-1).mean()) for k in range(m + 1)]
        out["map_share"].append(shares)
        out["self_share"].append(shares[-1])
        out["uniform_share"].append((sl.stop - sl.start) / sl.stop)
    return out


def attention_heatmap(weights: torch.Tensor, schedule, upto_step: int) -> torch.Tensor:
    """Spread one query's attention over the keys of steps 0..upto_step onto the full latent
    grid (each key token covers its cell of its step's grid): where in the image it looks.
    weights (K,) with K = offsets[upto_step + 1] -> (h_M, w_M), summing to 1."""
    hm, wm = schedule.full_hw
    out = torch.zeros(hm, wm)
    for k in range(upto_step + 1):
        s = schedule[k]
        w = weights[schedule.step_slice(k)].float().cpu().view(1, 1, s.h, s.w)
        out += F.interpolate(w, size=(hm, wm), mode="nearest")[0, 0] * (s.h * s.w) / (hm * wm)
    return out


def centre_query_attention(
    maps_per_step: list[torch.Tensor], schedule, index: int = 0
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Where the centre token of every step looks (Figure 10's attention rows): for image
    ``index`` of one map per cached step, the head-averaged attention of the step's centre token
    (row h_m // 2, column w_m // 2) as :func:`attention_heatmap`.
    -> (M heat maps (h_M, w_M), query centres (M, 2) in [0, 1) grid coordinates)"""
    pos = schedule.positions()
    heat, where = [], []
    for m, a in enumerate(maps_per_step):
        s = schedule[m]
        centre = (s.h // 2) * s.w + s.w // 2
        heat.append(attention_heatmap(a[index, :, centre].mean(0), schedule, m))
        where.append(pos[schedule.offsets[m] + centre])
    return heat, torch.stack(where)
