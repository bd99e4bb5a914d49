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


def step_attention_profile(maps_per_step: list[torch.Tensor], schedule) -> dict[str, list[float]]:
    """Per generation step: attention distance, and the share of attention a step's tokens
    give to their own step (vs. all earlier ones). ``maps_per_step``: one map per cached step."""
    pos = schedule.positions()
    dist, self_share = [], []
    for m, a in enumerate(maps_per_step):
        sl = schedule.step_slice(m)
        keys = slice(0, sl.stop)
        dist.append(attention_distance(a, pos[sl], pos[keys]))
        self_share.append(float(a[..., sl.start : sl.stop].sum(-1).mean()))
    return {"distance": dist, "self_share": self_share}


def attention_heatmap(weights: torch.Tensor, schedule, upto_step: int) -> torch.Tensor:
    """Spread one query's attention over the keys of steps 0..upto_step onto the full latent
    grid (each key token covers its cell of its step's grid): where in the image it looks.
    weights (K,) with K = offsets[upto_step + 1] -> (h_M, w_M), summing to 1."""
    import torch.nn.functional as F

    hm, wm = schedule.full_hw
    out = torch.zeros(hm, wm)
    for k in range(upto_step + 1):
        s = schedule[k]
        w = weights[schedule.step_slice(k)].float().view(1, 1, s.h, s.w)
        out += F.interpolate(w, size=(hm, wm), mode="nearest")[0, 0] * (s.h * s.w) / (hm * wm)
    return out
