"""TokenSchedule: the ordered token maps of one tokenization — the concept every part shares.

A schedule is the list of steps r_1..r_M of the paper (Eq. 9). Each step has a *kind*:

* ``base``: a scale of the multi-scale residual quantization of f_{B_n} (VAR's "next-scale"
  steps; Alg. 1 lines for k <= B). The last base scale is the full latent size (h_M, w_M).
* ``detail``: a residual-quantization step of one detail feature f_{D_t} = f_{B_{t-1}} - f_{B_t}
  (Eq. 8) at full latent size (Alg. 1 lines for k > B).

Detail factors are emitted coarse to fine — D_n first, D_1 last — with ``depth_per_factor``
steps each: "next-detail". ``order == 0`` is VAR (only base steps, of the image itself), and a
schedule whose base steps are all at full size is plain residual VQ ("vanilla" with depth 1).

The quantizer (Alg. 1 and 2), the transformer (sequence length, level ids, positions, the
block-causal mask), the sampler and the plots all read the same object.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class Step:
    kind: str  # "base" | "detail"
    factor: int  # 0 for base steps; t of D_t for detail steps (n ... 1)
    h: int
    w: int

    @property
    def numel(self) -> int:
        return self.h * self.w

    @property
    def label(self) -> str:
        return f"base {self.h}x{self.w}" if self.kind == "base" else f"D{self.factor}"


class ScheduleError(ValueError):
    """An invalid token schedule; the message says which value and how to fix it."""


class TokenSchedule:
    """An immutable, validated sequence of token-map steps (see module docstring)."""

    def __init__(self, steps: tuple[Step, ...] | list[Step]):
        self.steps: tuple[Step, ...] = tuple(steps)
        self._validate()

    # ------------------------------------------------------------------ constructors
    @classmethod
    def var(cls, patch_nums: tuple[int, ...] | list[int]) -> TokenSchedule:
        """VAR's next-scale schedule (decomposition order 0), e.g. (1,2,3,4,5,6,8,10,13,16)."""
        return cls([Step("base", 0, p, p) for p in patch_nums])

    @classmethod
    def cart(
        cls, base_patch_nums: tuple[int, ...] | list[int], n_factors: int, depth_per_factor: int
    ) -> TokenSchedule:
        """CART: B multi-scale base steps, then ``n_factors`` x ``depth_per_factor`` detail steps
        at full latent size, D_n first (the paper at 256^2: 8 base + 3 x 2 detail = 14 steps)."""
        if n_factors < 0:
            raise ScheduleError(f"n_factors={n_factors} must be >= 0 (the decomposition order)")
        if n_factors > 0 and depth_per_factor < 1:
            raise ScheduleError(
                f"depth_per_factor={depth_per_factor}: each of the {n_factors} detail factors "
                "needs at least one step"
            )
        if not base_patch_nums:
            raise ScheduleError("base_patch_nums is empty: give at least the full latent size")
        full = base_patch_nums[-1]
        base = [Step("base", 0, p, p) for p in base_patch_nums]
        detail = [
            Step("detail", t, full, full)
            for t in range(n_factors, 0, -1)
            for _ in range(depth_per_factor)
        ]
        return cls(base + detail)

    @classmethod
    def from_counts(
        cls, base_patch_nums: tuple[int, ...] | list[int], n_steps: int, n_factors: int
    ) -> TokenSchedule:
        """The paper's notation: M total steps, B = len(base_patch_nums) base steps, n factors;
        each factor gets (M - B) / n steps, which must be a whole number."""
        n_base = len(base_patch_nums)
        rest = n_steps - n_base
        if n_factors == 0:
            if rest != 0:
                raise ScheduleError(
                    f"order 0 (VAR) has only base steps: M={n_steps} must equal B={n_base}"
                )
            return cls.var(base_patch_nums)
        if rest <= 0 or rest % n_factors:
            raise ScheduleError(
                f"M - B = {n_steps} - {n_base} = {rest} detail steps cannot be split evenly over "
                f"n={n_factors} factors; choose M so that (M - B) is a positive multiple of n"
            )
        return cls.cart(base_patch_nums, n_factors, rest // n_factors)

    @classmethod
    def from_config(cls, tok_cfg, order: int) -> TokenSchedule:
        """The schedule of a :class:`cartlib.config.TokenizerConfig` at decomposition ``order``."""
        q = tok_cfg.quantizer
        if q == "vanilla":  # single-scale VQ (rq_depth 1 = VQ-VAE/VQGAN; > 1 = RQ-VAE)
            return cls.var([tok_cfg.base_patch_nums[-1]] * tok_cfg.rq_depth)
        if q == "multiscale" or order == 0:
            return cls.var(tok_cfg.base_patch_nums)
        if q == "base_detail":
            return cls.cart(tok_cfg.base_patch_nums, order, tok_cfg.depth_per_factor)
        raise ScheduleError(
            f"quantizer={q!r} is unknown: choose one of 'vanilla', 'multiscale', 'base_detail'"
        )

    def _validate(self) -> None:
        if not self.steps:
            raise ScheduleError("a token schedule needs at least one step (got zero steps)")
        if self.steps[0].kind != "base":
            raise ScheduleError("the first step must be a base step")
        base = [s for s in self.steps if s.kind == "base"]
        full = base[-1]
        for s in self.steps:
            if s.h < 1 or s.w < 1:
                raise ScheduleError(f"step {s} has an empty token map; sizes must be >= 1")
            if s.kind not in ("base", "detail"):
                raise ScheduleError(f"step kind {s.kind!r} must be 'base' or 'detail'")
            if s.h > full.h or s.w > full.w:
                raise ScheduleError(
                    f"base scales must end at the full latent size: step {s.h}x{s.w} is larger "
                    f"than the last base step {full.h}x{full.w}; put the largest scale last"
                )
        for a, b in zip(base, base[1:]):
            if b.h < a.h or b.w < a.w:
                raise ScheduleError(
                    f"base scales must not shrink: {a.h}x{a.w} is followed by {b.h}x{b.w}"
                )
        kinds = [s.kind for s in self.steps]
        if "detail" in kinds and "base" in kinds[kinds.index("detail") :]:
            raise ScheduleError("all base steps must come before the detail steps")
        details = [s for s in self.steps if s.kind == "detail"]
        for s in details:
            if (s.h, s.w) != (full.h, full.w):
                raise ScheduleError(
                    f"detail steps are at the full latent size {full.h}x{full.w}, got {s.h}x{s.w}"
                )
        factors = [s.factor for s in details]
        if factors != sorted(factors, reverse=True) or (factors and min(factors) != 1):
            raise ScheduleError(
                f"detail factors must run D_n ... D_1 (coarse to fine), got {factors}"
            )
        counts = {f: factors.count(f) for f in set(factors)}
        if len(set(counts.values())) > 1 or (factors and len(counts) != max(factors)):
            raise ScheduleError(f"every factor D_n..D_1 needs the same number of steps: {counts}")

    # ------------------------------------------------------------------ properties
    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self):
        return iter(self.steps)

    def __getitem__(self, i: int) -> Step:
        return self.steps[i]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TokenSchedule) and self.steps == other.steps

    def __hash__(self) -> int:
        return hash(self.steps)

    def __repr__(self) -> str:
        parts = [f"{s.h}" if s.kind == "base" else f"D{s.factor}" for s in self.steps]
        return f"TokenSchedule([{', '.join(parts)}], seq_len={self.seq_len})"

    @property
    def n_steps(self) -> int:  # M
        return len(self.steps)

    @property
    def n_base(self) -> int:  # B
        return sum(s.kind == "base" for s in self.steps)

    @property
    def n_factors(self) -> int:  # n, the decomposition order
        return max((s.factor for s in self.steps), default=0)

    @property
    def depth_per_factor(self) -> int:
        return (self.n_steps - self.n_base) // self.n_factors if self.n_factors else 0

    @property
    def full_hw(self) -> tuple[int, int]:
        last = [s for s in self.steps if s.kind == "base"][-1]
        return last.h, last.w

    @property
    def seq_len(self) -> int:
        return sum(s.numel for s in self.steps)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Start of each step in the flattened sequence (length M + 1, last = seq_len)."""
        out = [0]
        for s in self.steps:
            out.append(out[-1] + s.numel)
        return tuple(out)

    def step_slice(self, m: int) -> slice:
        return slice(self.offsets[m], self.offsets[m + 1])

    def level_ids(self) -> torch.Tensor:
        """(L,) the step index m of every token."""
        return torch.cat(
            [torch.full((s.numel,), m, dtype=torch.long) for m, s in enumerate(self.steps)]
        )

    def positions(self) -> torch.Tensor:
        """(L, 2) each token's (y, x) centre in [0, 1) coordinates of the full latent grid."""
        rows = []
        for s in self.steps:
            y = (torch.arange(s.h, dtype=torch.float32) + 0.5) / s.h
            x = (torch.arange(s.w, dtype=torch.float32) + 0.5) / s.w
            rows.append(torch.stack(torch.meshgrid(y, x, indexing="ij"), -1).reshape(-1, 2))
        return torch.cat(rows)

    def attn_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(L, L) bool, True where query token may attend to key token: block-causal, so every
        token of step m sees all tokens of steps <= m (the maps are predicted in parallel)."""
        lv = self.level_ids().to(device)
        return lv[:, None] >= lv[None, :]

    def describe(self) -> str:
        base = ",".join(str(s.h) for s in self.steps if s.kind == "base")
        if not self.n_factors:
            return f"{self.n_steps} steps: scales ({base}); {self.seq_len} tokens"
        return (
            f"{self.n_steps} steps: base scales ({base}) + {self.n_factors} detail factors x "
            f"{self.depth_per_factor} at {self.full_hw[0]}x{self.full_hw[1]}; {self.seq_len} tokens"
        )
