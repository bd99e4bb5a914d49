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
* Attention: block-causal (a token of step m sees the tokens of steps <= m); in sampling a KV
  cache holds earlier steps so nothing is recomputed. Setting ``SelfAttention.store_attn = True``
  makes a block keep its attention map (for notebook 07) — the same module, computed explicitly.

Training attention has three paths, equal up to float rounding (``tests/test_attention_paths.py``:
forward and gradients within 1e-5 in fp32), chosen by ``attention`` (``ARConfig.attention``):

* ``sdpa``, the reference: one ``scaled_dot_product_attention`` call with the (L, L) boolean
  mask. It computes all L^2 query-key pairs, of which the mask keeps 55.7 % for CART-256 (2066
  tokens) and 61.9 % for VAR's 680; on CUDA the mask rules out the Flash kernel.
* ``per_step``: one SDPA call per step, its queries against the dense key prefix of steps <= m,
  without a mask (so Flash/cuDNN on CUDA): exactly the allowed pairs. The first, tiny steps
  (fewer than ``PER_STEP_MIN_QUERIES`` queries together) share one call with their rows of the
  mask, which saves calls that cost more than they compute.
* ``flex``: ``torch.nn.attention.flex_attention`` with a ``BlockMask`` built once per device from
  the schedule (block-sparse in 128 x 128 tiles); compiled on CUDA. torch 2.14 has no flex
  backward on the CPU, and flex has no attention dropout: in those cases (and whenever attention
  maps are recorded) the call runs the reference instead.

``auto`` (:func:`attention_path`) is ``per_step`` on the CPU, measured (fp32, 2-core AVX2 EPYC,
training steps timed in alternation): 1.05-1.07x the reference's tokens/s at the smoke and tiny
presets' shapes and at d8/width 512 on VAR's 680 tokens, 1.18-1.20x on CART's 2066
(``benchmarks/bench_ar.py --anchor``, docs/history.md 2026-12-07). On CUDA ``per_step`` too, by
expectation: exactly the allowed pairs through Flash/cuDNN against flex's 128 x 128 tiles (61 %
of the pairs for CART's 2066, 78 % for VAR's 680) and the masked kernels' 100 %;
``benchmarks/gpu_check.py``'s table must confirm it. Under bf16 autocast on the CPU both paths
take the explicit product (``cpu_bf16_explicit``), ``per_step`` per call, unmasked but the first:
not measured on an avx512_bf16 CPU (emulated bf16 here: 1.03x). Attention dropout and
``attn_l2_norm``'s scale act in every path as in the reference (dropout: the same rate on each
probability, other random draws). Sampling (``forward_step``) attends densely to the cache and
is the same whatever the path.

``compile`` (:func:`compile_on`): regional ``torch.compile`` of each block for the training
forward, as torchtitan does; the blocks share one compiled graph (same code, parameters as
inputs). ``auto`` = on CUDA, off on the CPU: there it needs a C compiler and 20-60 s of
compiling (cold cache) for 1.0-1.14x per step (1.04x at the smoke/tiny shapes), which the
short CPU runs never earn back. Compiled stochastic depth and dropout draw from inductor's
generator, not torch's: the same rates, other masks. Sampling runs the blocks eagerly.

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

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cartlib.schedule import TokenSchedule

MAX_LOG_SCALE = math.log(100.0)  # VAR's cap on the per-head scale of L2-normalised attention
ATTENTION_PATHS = ("auto", "sdpa", "per_step", "flex")
COMPILE_CHOICES = ("auto", True, False)
PER_STEP_MIN_QUERIES = 64  # leading steps share one masked call until it has this many queries


def attention_path(setting: str, device: torch.device | str) -> str:
    """The training attention path of ``setting`` (one of :data:`ATTENTION_PATHS`) on
    ``device``: ``auto`` -> ``per_step`` everywhere (see the module doc)."""
    if setting not in ATTENTION_PATHS:
        raise ValueError(
            f"attention={setting!r} is unknown: choose one of {', '.join(ATTENTION_PATHS)}"
        )
    return "per_step" if setting == "auto" else setting


def compile_on(setting: str | bool, device: torch.device | str) -> bool:
    """Whether the blocks run compiled on ``device``: ``auto`` -> on CUDA only."""
    if setting not in COMPILE_CHOICES:
        raise ValueError(f"compile={setting!r} is unknown: choose 'auto', True or False")
    return torch.device(device).type == "cuda" if setting == "auto" else setting


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, block_mask, scale: float) -> torch.Tensor:
    """flex_attention: compiled on CUDA; eager on the CPU, where it only runs without gradients
    and is a slow reference that materialises all L^2 scores (tests check the mask with it)."""
    from torch.nn.attention.flex_attention import flex_attention

    fn = _compiled_flex() if q.device.type == "cuda" else flex_attention
    return fn(q, k, v, block_mask=block_mask, scale=scale)


def _step_groups(offsets: tuple[int, ...], min_queries: int) -> list[tuple[int, int]]:
    """(start, stop) query ranges of the per-step calls: one per step, except that leading
    steps are merged until a call has ``min_queries`` queries."""
    groups, start = [], 0
    for stop in offsets[1:]:
        if stop - start >= min_queries or stop == offsets[-1]:
            groups.append((start, stop))
            start = stop
    return groups


@dataclass(frozen=True, eq=False)
class BlockCausal:
    """The schedule's block-causal attention in the form a training path needs (module doc).

    ``mask`` (L, L) bool is the reference. ``per_step``: ``groups`` (start, stop, rows) — queries
    start:stop see keys :stop, through ``rows`` (their rows of the mask) or densely (None).
    ``flex``: ``block_mask``, flex_attention's BlockMask of the same mask."""

    path: str
    mask: torch.Tensor
    groups: tuple[tuple[int, int, torch.Tensor | None], ...] = ()
    block_mask: object = None

    @classmethod
    def build(cls, schedule: TokenSchedule, path: str, device) -> BlockCausal:
        mask = schedule.attn_mask(device)
        if path == "per_step":
            groups = []
            for a, b in _step_groups(schedule.offsets, PER_STEP_MIN_QUERIES):
                rows = mask[a:b, :b]
                groups.append((a, b, None if bool(rows.all()) else rows.contiguous()))
            return cls(path, mask, groups=tuple(groups))
        if path == "flex":
            from torch.nn.attention.flex_attention import create_block_mask

            lv = schedule.level_ids().to(device)
            L = schedule.seq_len
            keep = lambda b, h, q, k: lv[q] >= lv[k]  # noqa: E731 — a query sees steps <= its own
            return cls(path, mask, block_mask=create_block_mask(keep, None, None, L, L, device))
        raise ValueError(f"BlockCausal has no path {path!r}; 'sdpa' uses the mask alone")


def no_key_bias(width: int) -> torch.Tensor:
    """The mask of the fused qkv bias that keeps the query and value thirds (VAR has no key
    bias): (3 width,), 1 1 ... 0 0 ... 1 1."""
    keep = torch.ones(3, width)
    keep[1] = 0
    return keep.flatten()


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
            self.register_buffer("bias_keep", no_key_bias(width), persistent=False)
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

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | BlockCausal | None, cache: dict | None = None
    ) -> torch.Tensor:
        """x (B, n, W) -> (B, n, W). ``mask``: the reference (L, L) bool mask, a
        :class:`BlockCausal` (a faster path to the same result) or None (dense: a sampling step
        against its ``cache``)."""
        b, n, c = x.shape
        q, k, v, scale = self.qkv_heads(x)
        if cache is not None:  # sampling: keys/values of earlier steps are kept, not recomputed
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        p = self.dropout if self.training else 0.0
        path = mask.path if isinstance(mask, BlockCausal) else "sdpa"
        cpu_grad = q.device.type == "cpu" and q.requires_grad  # torch 2.14: no flex backward
        if self.store_attn or (path == "flex" and (p > 0 or cpu_grad)):
            path = "sdpa"  # what flex cannot do, and recorded maps: the reference
        if path == "per_step":  # queries a:b against the key prefix :b, masked or dense
            parts = [self.attend(q[:, :, a:b], k[:, :, :b], v[:, :, :b], rows, scale, p)
                     for a, b, rows in mask.groups]  # fmt: skip
            out = torch.cat(parts, dim=2)
        elif path == "flex":  # under autocast SDPA casts q, k (fp32 after L2 norm) to v's dtype
            out = _flex(q.to(v.dtype), k.to(v.dtype), v, mask.block_mask, scale)
        else:
            ref = mask.mask if isinstance(mask, BlockCausal) else mask
            out = self.attend(q, k, v, ref, scale, p)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def attend(self, q, k, v, mask: torch.Tensor | None, scale: float, p: float) -> torch.Tensor:
        """Softmax attention of q (B, h, n, d) on k, v (B, h, m, d) where ``mask`` (n, m) allows
        (None: everywhere), with dropout ``p`` on the probabilities -> (B, h, n, d)."""
        # On CPUs under bf16 autocast the explicit product is ~1.4x faster per training step than
        # the fused kernel (benchmarks/bench_ar.py); elsewhere SDPA (flash/memory-efficient).
        cpu_bf16 = q.device.type == "cpu" and q.dtype == torch.bfloat16
        if not (self.store_attn or (self.cpu_bf16_explicit and cpu_bf16)):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=scale)
        scores = (q * scale) @ k.transpose(-2, -1)
        if mask is not None:  # additive -inf bias: cheaper than masked_fill, same result
            scores = scores + torch.zeros(
                mask.shape, dtype=scores.dtype, device=mask.device
            ).masked_fill(~mask, float("-inf"))
        attn = scores.softmax(-1)
        if self.store_attn:
            self.last_attn = attn.detach()
        if p > 0:
            attn = F.dropout(attn, p)
        return attn @ v


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
        attention: str = "auto",
        compile: str | bool = "auto",
    ):
        super().__init__()
        attention_path(attention, "cpu"), compile_on(compile, "cpu")  # unknown values: refused
        self.attention, self.compile_blocks = attention, compile
        self._plans: dict[tuple[str, torch.device], BlockCausal] = {}  # per path and device
        self._compiled: tuple[tuple[int, ...], list[nn.Module]] | None = None
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
    def init_buffers(self) -> None:
        """Fill the buffers that are not state (the level ids, the block-causal mask, the
        attention's key-bias switch) from the schedule: after ``to_empty`` of a model built on
        the meta device, they hold whatever memory they were given."""
        self.level_ids.copy_(self.schedule.level_ids())
        self.mask.copy_(self.schedule.attn_mask())
        for m in self.modules():
            if isinstance(m, SelfAttention) and hasattr(m, "bias_keep"):
                m.bias_keep.copy_(no_key_bias(m.bias_keep.numel() // 3))

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
        mask = self.block_causal(x.device)
        for blk in self.training_blocks(x.device):
            x = blk(x, bc, mask)
        return self.logits(x, cond)

    def block_causal(self, device: torch.device) -> torch.Tensor | BlockCausal:
        """The block-causal mask in the form of this model's attention path on ``device``: the
        reference mask for ``sdpa``, else a :class:`BlockCausal` (built once per device)."""
        path = attention_path(self.attention, device)
        if path == "sdpa":
            return self.mask
        key = (path, torch.device(device))
        if key not in self._plans:
            self._plans[key] = BlockCausal.build(self.schedule, path, device)
        return self._plans[key]

    def training_blocks(self, device: torch.device) -> list[nn.Module]:
        """The blocks the teacher-forced forward runs: ``torch.compile`` of each (regional, as
        torchtitan; compiled on first use, again if the blocks were wrapped since) when
        ``compile`` is on for ``device``, else the blocks themselves."""
        if not compile_on(self.compile_blocks, device) or torch.compiler.is_compiling():
            return list(self.blocks)
        ids = tuple(id(b) for b in self.blocks)
        if self._compiled is None or self._compiled[0] != ids:
            self._compiled = ids, [torch.compile(b) for b in self.blocks]
        return self._compiled[1]

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
