"""The next-detail transformer: a class-conditional, decoder-only transformer in the VAR style.

It learns P(r_m | r_<m, class) (Eq. 9) and predicts all h_m x w_m tokens of a step in parallel.

* Start: the class embedding (with a null class for classifier-free guidance) plus a learned
  start position fills the first step's tokens.
* Input of step m > 1: the accumulated feature f_hat of steps < m resampled to step m's size
  (``ScheduleQuantizer.next_input``), projected by ``word_embed`` into the model width.
* Every token gets a learned position embedding (one per sequence index, as VAR) plus the level
  embedding of its step.
* Blocks: pre-norm attention and MLP, both modulated by the class through AdaLN (shift, scale,
  gate; gates zero-initialised so each block starts as the identity, as DiT's adaLN-Zero).
* Attention: ``torch.nn.functional.scaled_dot_product_attention`` with the schedule's block-causal
  mask; in sampling a KV cache holds earlier steps so nothing is recomputed. Setting
  ``SelfAttention.store_attn = True`` makes a block keep its attention map (for notebook 07) —
  the same module, computed explicitly instead of by SDPA.

Width = 64 * depth and heads = depth by default (VAR's rule).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cartlib.schedule import TokenSchedule


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width={width} is not divisible by heads={heads}")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.store_attn = False
        self.last_attn: torch.Tensor | None = None  # (B, heads, Lq, Lk) when store_attn

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: dict | None = None):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:  # sampling: keys/values of earlier steps are kept, not recomputed
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        # On CPUs under bf16 autocast the explicit product is ~1.4x faster per training step than
        # the fused kernel (benchmarks/bench_ar.py); elsewhere SDPA (flash/memory-efficient).
        explicit = self.store_attn or (q.device.type == "cpu" and q.dtype == torch.bfloat16)
        if explicit:
            scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
            if mask is not None:  # additive -inf bias: cheaper than masked_fill, same result
                scores = scores + torch.zeros(
                    mask.shape, dtype=scores.dtype, device=mask.device
                ).masked_fill(~mask, float("-inf"))
            attn = scores.softmax(-1)
            if self.store_attn:
                self.last_attn = attn.detach()
            if self.training and self.dropout > 0:
                attn = F.dropout(attn, self.dropout)
            out = attn @ v
        else:
            p = self.dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden, width),
            nn.Dropout(dropout),
        )
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))  # AdaLN from the class

    def forward(self, x, cond, mask, cache=None):
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(cond)[:, None].chunk(6, dim=-1)  # (B,1,W) each
        x = x + g1 * self.attn(self.norm1(x) * (1 + sc1) + sh1, mask, cache)
        return x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + sh2)


class NextDetailTransformer(nn.Module):
    def __init__(
        self,
        schedule: TokenSchedule,
        vocab_size: int,
        latent_dim: int,
        num_classes: int,
        depth: int,
        width: int | None = None,
        heads: int | None = None,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.schedule, self.num_classes = schedule, num_classes
        self.depth = depth
        self.width = width = width or 64 * depth
        heads = heads or depth
        first = schedule[0].numel
        self.class_emb = nn.Embedding(num_classes + 1, width)  # index num_classes = null class
        self.pos_start = nn.Parameter(torch.empty(1, first, width))
        self.word_embed = nn.Linear(latent_dim, width)
        self.pos_emb = nn.Parameter(torch.empty(1, schedule.seq_len, width))
        self.lvl_emb = nn.Embedding(schedule.n_steps, width)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, dropout) for _ in range(depth))
        self.head_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.head_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.head = nn.Linear(width, vocab_size)
        self.register_buffer("level_ids", schedule.level_ids(), persistent=False)
        self.register_buffer("mask", schedule.attn_mask(), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        std = math.sqrt(1 / self.width / 3)  # VAR's init scale
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.pos_start, self.pos_emb):
            nn.init.trunc_normal_(p, std=std)
        for blk in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(blk.ada[-1].weight)
            nn.init.zeros_(blk.ada[-1].bias)
        nn.init.zeros_(self.head_ada[-1].weight)
        nn.init.zeros_(self.head_ada[-1].bias)
        self.head.weight.data.mul_(0.1)

    # ------------------------------------------------------------------ training forward
    def forward(self, labels: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits of every token. labels (B,), inputs (B, L - h_1 w_1, C)
        from ``ScheduleQuantizer.teacher_inputs`` -> logits (B, L, V)."""
        cond = self.class_emb(labels)  # (B, W)
        sos = cond[:, None] + self.pos_start  # (B, h_1 w_1, W)
        x = torch.cat([sos, self.word_embed(inputs)], dim=1)
        x = x + self.pos_emb + self.lvl_emb(self.level_ids)[None]
        for blk in self.blocks:
            x = blk(x, cond, self.mask)
        return self.logits(x, cond)

    def logits(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.head_ada(cond)[:, None].chunk(2, dim=-1)
        return self.head(self.head_norm(x) * (1 + scale) + shift).float()

    # ------------------------------------------------------------------ cached step forward
    def step_tokens(self, m: int, cond: torch.Tensor, inputs: torch.Tensor | None) -> torch.Tensor:
        """The embedded input tokens of step m: the start token for m = 0, else
        ``word_embed(inputs)`` (inputs (B, h_m w_m, C)); plus position and level embeddings."""
        sl = self.schedule.step_slice(m)
        x = cond[:, None] + self.pos_start if m == 0 else self.word_embed(inputs)
        return x + self.pos_emb[:, sl] + self.lvl_emb.weight[m]

    def forward_step(self, x: torch.Tensor, cond: torch.Tensor, caches: list[dict]) -> torch.Tensor:
        """Logits of one step's tokens given the KV caches of the steps before (updated in
        place). Block-causal attention needs no mask here: a step sees all earlier steps and all
        of its own tokens. x (B, h_m w_m, W) -> (B, h_m w_m, V)"""
        for blk, cache in zip(self.blocks, caches):
            x = blk(x, cond, None, cache)
        return self.logits(x, cond)

    def new_caches(self) -> list[dict]:
        return [{} for _ in self.blocks]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
