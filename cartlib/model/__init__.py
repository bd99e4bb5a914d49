"""The next-detail transformer and its presets."""

from __future__ import annotations

import torch

from cartlib.config import load_preset
from cartlib.model.transformer import NextDetailTransformer

# VAR's parameter counts (310M, 601M, 1.03B, 2.01B; Tian et al. 2024) for comparison.
VAR_PARAMS = {16: 310e6, 20: 601e6, 24: 1.03e9, 30: 2.01e9}


def build_model(cfg, schedule, num_classes: int, device=None) -> NextDetailTransformer:
    """The transformer of ``cfg`` (a RunConfig) for ``schedule`` and ``num_classes`` classes."""
    a, t = cfg.ar, cfg.tokenizer
    with torch.device(device) if device is not None else torch.device("cpu"):
        return NextDetailTransformer(
            schedule,
            t.codebook_size,
            t.latent_channels,
            num_classes,
            a.depth,
            a.model_width,
            a.model_heads,
            a.mlp_ratio,
            a.dropout,
            attn_l2_norm=a.attn_l2_norm,
            drop_path=a.drop_path_rate,
            shared_adaln=a.shared_adaln,
            init_adaln=a.init_adaln,
            init_adaln_gamma=a.init_adaln_gamma,
            init_head=a.init_head,
            init_residual_scale=a.init_residual_scale,
            attention=a.attention,
            compile=a.compile,
        )


def preset_param_count(preset: str, num_classes: int = 1000) -> int:
    """Parameter count of a preset's transformer, built on the meta device (no memory used)."""
    cfg = load_preset(preset)
    return build_model(cfg, cfg.schedule(), num_classes, device="meta").num_params()


__all__ = ["NextDetailTransformer", "VAR_PARAMS", "build_model", "preset_param_count"]
