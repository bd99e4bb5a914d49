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

VAR's details, each an option (``ARConfig``; the full-scale presets switch them on as VAR does,
the smoke/tiny presets keep the plain model):

* ``attn_l2_norm``: attention on L2-normalised queries and keys, the query times a learned
  per-head scale exp(s_h) (initial 4, at most 100), so a logit is a cosine times at most 100;
  the key bias is held at 0 as VAR has none (it would shift the normalised keys).
* ``drop_path``: stochastic depth on both residual branches, rate rising linearly from 0 at the
  first block to ``drop_path`` at the last (VAR: 0.1 * depth / 24).
* VAR's initialisation: every Linear/Embedding and the position tables trunc-normal with std
  sqrt(1 / (3 W)); adaLN shift/scale weights x ``init_adaln``, gate weights x
  ``init_adaln_gamma``, head x ``init_head``; attention and MLP output projections divided by
  sqrt(2 depth) (``init_residual_scale``). With the defaults (0, 0, 0.1, off) the gates start
  at 0: DiT's adaLN-Zero.
* ``shared_adaln`` (VAR-d36-s): one SiLU + Linear maps the class to the 6 W modulation values
  for every block; each block adds its own learned offset ``ada_gss`` (1, 6 W).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cartlib.schedule import TokenSchedule

MAX_LOG_SCALE = math.log(100.0)  # VAR's cap on the per-head scale of L2-normalised attention


class SelfAttention(nn.Module):
    cpu_bf16_explicit = True  # CPU under bf16 autocast: explicit product instead of SDPA

    def __init__(self, width: int, heads: int, dropout: float = 0.0, l2_norm: bool = False):
        super().__init__()
        if width % heads:
            raise ValueError(f"width={width} is not divisible by heads={heads}")
        self.heads, self.dropout, self.l2_norm = heads, dropout, l2_norm
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        if l2_norm:  # log of the per-head scale, initial 4 (VAR)
            self.scale_mul = nn.Parameter(torch.full((1, heads, 1, 1), 4.0).log())
            keep = torch.ones(3, width)
            keep[1] = 0  # no key bias
            self.register_buffer("bias_keep", keep.flatten(), persistent=False)
        self.store_attn = False
        self.last_attn: torch.Tensor | None = None  # (B, heads, Lq, Lk) when store_attn

    def qkv_heads(self, x: torch.Tensor):
        """q, k, v (B, heads, n, c / heads) of x (B, n, c); L2-normalised q (scaled) and k when
        ``l2_norm``. -> (q, k, v, softmax scale)"""
        b, n, c = x.shape
        bias = self.qkv.bias * self.bias_keep if self.l2_norm else self.qkv.bias
        qkv = F.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if not self.l2_norm:
            return q, k, v, q.shape[-1] ** -0.5
        q = F.normalize(q, dim=-1) * self.scale_mul.clamp(max=MAX_LOG_SCALE).exp().to(q.dtype)
        return q, F.normalize(k, dim=-1), v, 1.0

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: dict | None = None):
        b, n, c = x.shape
        q, k, v, scale = self.qkv_heads(x)
        if cache is not None:  # sampling: keys/values of earlier steps are kept, not recomputed
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        # On CPUs under bf16 autocast the explicit product is ~1.4x faster per training step than
        # the fused kernel (benchmarks/bench_ar.py); elsewhere SDPA (flash/memory-efficient).
        cpu_bf16 = q.device.type == "cpu" and q.dtype == torch.bfloat16
        explicit = self.store_attn or (self.cpu_bf16_explicit and cpu_bf16)
        if explicit:
            scores = (q * scale) @ k.transpose(-2, -1)
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
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): in training a residual branch is dropped for each
    sample with probability p and kept samples are scaled by 1 / (1 - p); identity in eval."""

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"drop_path={p} must be in [0, 1)")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, ...)
        if not self.training or self.p == 0:
            return x
        keep = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1 - self.p)


class Block(nn.Module):
    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float,
        dropout: float,
        l2_norm: bool = False,
        drop_path: float = 0.0,
        shared_adaln: bool = False,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(width, heads, dropout, l2_norm)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden, width),
            nn.Dropout(dropout),
        )
        self.drop_path = DropPath(drop_path)
        if shared_adaln:  # VAR-d36-s: the model's shared projection + this block's offset
            self.ada_gss = nn.Parameter(torch.randn(1, 6 * width) / width**0.5)
        else:  # AdaLN from the class
            self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def modulation(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, 6 W): shift, scale, gate of attention, then of the MLP. ``cond`` is the class
        embedding, or with shared adaLN the shared projection of it (B, 6 W)."""
        return self.ada_gss + cond if hasattr(self, "ada_gss") else self.ada(cond)

    def forward(self, x, cond, mask, cache=None):
        sh1, sc1, g1, sh2, sc2, g2 = self.modulation(cond)[:, None].chunk(6, dim=-1)  # (B,1,W)
        x = x + self.drop_path(g1 * self.attn(self.norm1(x) * (1 + sc1) + sh1, mask, cache))
        return x + self.drop_path(g2 * self.mlp(self.norm2(x) * (1 + sc2) + sh2))


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
        *,
        attn_l2_norm: bool = False,
        drop_path: float = 0.0,
        shared_adaln: bool = False,
        init_adaln: float = 0.0,
        init_adaln_gamma: float = 0.0,
        init_head: float = 0.1,
        init_residual_scale: bool = False,
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
        rates = [drop_path * i / max(1, depth - 1) for i in range(depth)]  # rising (VAR)
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio, dropout, attn_l2_norm, rates[i], shared_adaln)
            for i in range(depth)
        )
        self.shared_ada = (
            nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width)) if shared_adaln else None
        )
        self.head_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.head_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.head = nn.Linear(width, vocab_size)
        self.register_buffer("level_ids", schedule.level_ids(), persistent=False)
        self.register_buffer("mask", schedule.attn_mask(), persistent=False)
        self._init_weights(init_adaln, init_adaln_gamma, init_head, init_residual_scale)

    @torch.no_grad()
    def _init_weights(self, adaln: float, adaln_gamma: float, head: float, residual: bool) -> None:
        """VAR's ``init_weights`` (models/var.py); the defaults give adaLN-Zero (see module doc)."""
        std = math.sqrt(1 / self.width / 3)  # VAR's init scale
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.pos_start, self.pos_emb):
            nn.init.trunc_normal_(p, std=std)
        gates = torch.zeros(6, 1, dtype=torch.bool)
        gates[[2, 5]] = True  # (shift, scale, gate) x (attention, MLP): rows of the gates
        for blk in self.blocks:
            if hasattr(blk, "ada_gss"):
                w = blk.ada_gss.data.view(6, -1)
            else:
                w = blk.ada[-1].weight.data.view(6, -1)
                nn.init.zeros_(blk.ada[-1].bias)
            w.mul_(torch.where(gates, adaln_gamma, adaln))
            if residual:  # output projections of the residual branches / sqrt(2 depth)
                blk.attn.proj.weight.div_(math.sqrt(2 * self.depth))
                blk.mlp[2].weight.div_(math.sqrt(2 * self.depth))
        self.head_ada[-1].weight.mul_(adaln)
        nn.init.zeros_(self.head_ada[-1].bias)
        self.head.weight.mul_(head)
        nn.init.zeros_(self.head.bias)

    def block_cond(self, cond: torch.Tensor) -> torch.Tensor:
        """What the blocks take: the class embedding (B, W), or its shared adaLN projection."""
        return cond if self.shared_ada is None else self.shared_ada(cond)

    # ------------------------------------------------------------------ training forward
    def forward(self, labels: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits of every token. labels (B,), inputs (B, L - h_1 w_1, C)
        from ``ScheduleQuantizer.teacher_inputs`` -> logits (B, L, V)."""
        cond = self.class_emb(labels)  # (B, W)
        sos = cond[:, None] + self.pos_start  # (B, h_1 w_1, W)
        x = torch.cat([sos, self.word_embed(inputs)], dim=1)
        x = x + self.pos_emb + self.lvl_emb(self.level_ids)[None]
        bc = self.block_cond(cond)
        for blk in self.blocks:
            x = blk(x, bc, self.mask)
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
        bc = self.block_cond(cond)
        for blk, cache in zip(self.blocks, caches):
            x = blk(x, bc, None, cache)
        return self.logits(x, cond)

    def new_caches(self) -> list[dict]:
        return [{} for _ in self.blocks]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
