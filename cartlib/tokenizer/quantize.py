"""Quantizers: vanilla, multi-scale (VAR) and base-detail (CART, Algorithms 1 and 2).

All three are one :class:`ScheduleQuantizer` driven by a :class:`~cartlib.schedule.TokenSchedule`,
because they differ only in the schedule and in which feature each step quantizes:

* ``vanilla``   — one step at full size: plain VQ (Eq. 1).
* ``multiscale``— base steps only (order 0): VAR's residual multi-scale quantization of f_I.
* ``base_detail`` — Alg. 1: base steps quantize f_{B_n} at growing scales, then each detail
  feature f_{D_t} = f_{B_{t-1}} - f_{B_t} (Eq. 8, f_{B_0} = f_I) is residual-quantized at full
  size, D_n first. Reconstruction (Alg. 2) is f_hat = sum_k phi_k(z_k), base terms upsampled to
  full size first.

Each step has its own phi_k (a 3x3 conv mixed with its input, phi(z) = (1-r) z + r conv(z),
r = 1/2 as in VAR), or ``phi_share`` shared convs picked by the step's relative position (VAR's
"partially shared" phi). One codebook Z (V x C) serves every step.

Straight-through (``straight_through``, see docs/straight-through.md): the decoder sees f_hat's
value in both modes; its gradient reaches the encoder through f (f_I, f_{B_n}) always, and
``"cartlib"`` also lets it reach the codebook and the phi convs through f_hat itself. ``"var"``
(VAR's VQ-VAE, ``VectorQuantizer2.forward``) stops it there: the codebook and the phi convs then
learn only from the VQ loss (each step's accumulated f_hat against f). The forward values are the
same in both modes.

Shapes: features (B, C, h_M, w_M); token maps r_k (B, h_k, w_k) of int64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cartlib.schedule import TokenSchedule
from cartlib.tokenizer.vqvae import resize

QUANTIZERS = ("vanilla", "multiscale", "base_detail")
STRAIGHT_THROUGH = ("cartlib", "var")


def resolve_straight_through(straight_through: str | None, arch: str) -> str:
    """``TokenizerConfig.straight_through`` as the quantizer uses it: the value when set, else by
    the tokenizer's arch ("var" for ``arch: var``, as VAR trains its VQ-VAE; "cartlib" otherwise,
    what every cartlib tokenizer trained before the option existed used)."""
    if straight_through is None:
        return "var" if arch == "var" else "cartlib"
    if straight_through not in STRAIGHT_THROUGH:
        raise ValueError(
            f"straight_through={straight_through!r}: choose one of "
            f"{', '.join(STRAIGHT_THROUGH)} (or None: by arch)"
        )
    return straight_through


class Phi(nn.Module):
    """phi_k: refinement conv applied to a looked-up (and upsampled) code map."""

    def __init__(self, dim: int, kernel: int = 3, resi: float = 0.5):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2)
        self.resi = resi

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * (1 - self.resi) + self.conv(z) * self.resi


@dataclass
class QuantOutput:
    f_hat: torch.Tensor  # (B,C,h,w) sum of all phi terms (Alg. 2), straight-through to f_I
    f_hat_base: torch.Tensor  # (B,C,h,w) sum of the base terms, straight-through to f_{B_n}
    tokens: list[torch.Tensor]  # r_1..r_M, each (B,h_k,w_k)
    vq_loss: torch.Tensor  # codebook + beta * commitment, averaged over steps
    step_mse: torch.Tensor  # (M,) feature MSE of each residual chain after step k (detached)


class ScheduleQuantizer(nn.Module):
    def __init__(
        self,
        schedule: TokenSchedule,
        codebook_size: int,
        dim: int,
        beta: float = 0.25,
        phi_share: int = 0,
        phi_kernel: int = 3,
        carry: bool = False,
        straight_through: str = "cartlib",
    ):
        super().__init__()
        self.schedule = schedule
        self.carry = carry
        self.straight_through = resolve_straight_through(straight_through, "cartlib")
        self.beta = beta
        self.codebook = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.codebook.weight, -1 / codebook_size, 1 / codebook_size)
        n_phi = schedule.n_steps if phi_share == 0 else phi_share
        self.phis = nn.ModuleList(Phi(dim, phi_kernel) for _ in range(n_phi))
        self.phi_share = phi_share
        self.register_buffer("usage", torch.zeros(codebook_size))  # hits since last restart
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def codebook_size(self) -> int:
        return self.codebook.num_embeddings

    def phi(self, m: int) -> Phi:
        """phi_k of step m: its own conv, or (phi_share = K) the one of K shared convs whose
        tick is nearest to m / (M - 1); ticks evenly spaced in [1/(3K), 1 - 1/(3K)] for K = 4
        and in [1/(2K), 1 - 1/(2K)] otherwise (VAR's ``PhiPartiallyShared``)."""
        if self.phi_share == 0:
            return self.phis[m]
        k = self.phi_share
        at = m / max(1, self.schedule.n_steps - 1)
        margin = 1 / (3 * k) if k == 4 else 1 / (2 * k)
        ticks = torch.linspace(margin, 1 - margin, k, dtype=torch.float64)
        return self.phis[int((ticks - at).abs().argmin())]

    # ----------------------------------------------------------------------- codes
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Eq. 1: index of the nearest codebook vector for every position. (B,C,h,w)->(B,h,w)"""
        b, c, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):  # distances in fp32, also under AMP
            flat = z.permute(0, 2, 3, 1).reshape(-1, c).float()
            emb = self.codebook.weight.float()
            d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ emb.T + emb.pow(2).sum(1)[None]
            idx = d.argmin(1)
        if self.training:
            self.usage += torch.bincount(idx, minlength=self.codebook_size).to(self.usage)
        return idx.view(b, h, w)

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """(B,h,w) -> (B,C,h,w)"""
        return self.codebook(idx).permute(0, 3, 1, 2)

    def step_term(self, idx: torch.Tensor, m: int) -> torch.Tensor:
        """phi_m(interpolate(lookup(r_m), h_M, w_M)) — one term of Alg. 2. (B,h,w)->(B,C,H,W)"""
        z = resize(self.lookup(idx), self.schedule.full_hw)
        return self.phi(m)(z)

    # ----------------------------------------------------------------------- Alg. 1
    def targets(
        self, f_image: torch.Tensor, f_bases: list[torch.Tensor] | None
    ) -> dict[int, torch.Tensor]:
        """The feature each residual chain quantizes: chain 0 = base (f_{B_n}, or f_I at order 0),
        chain t = f_{D_t} = f_{B_{t-1}} - f_{B_t} (Eq. 8, f_{B_0} = f_I)."""
        n = self.schedule.n_factors
        if n == 0:
            return {0: f_image}
        if f_bases is None or len(f_bases) != n:
            got = "none" if f_bases is None else len(f_bases)
            raise ValueError(
                f"the base-detail quantizer of order {n} needs the features of B_1..B_{n} "
                f"(got {got}); pass bases=decompose.base_detail(x, order={n}).bases"
            )
        chain = [f_image, *f_bases]  # f_{B_0} .. f_{B_n}
        out = {0: chain[n]}
        for t in range(1, n + 1):
            out[t] = chain[t - 1] - chain[t]  # Eq. 8
        return out

    def chain_targets(self, f_image, f_bases) -> dict[int, torch.Tensor]:
        """What each step's residual chain approximates. ``carry=False`` (Alg. 1 as printed):
        chain 0 = f_{B_n}, chain t = f_{D_t}, each quantized on its own. ``carry=True``: one
        chain whose target moves from f_{B_n} to f_{B_{t-1}} = f_{B_n} + f_{D_n} + ... + f_{D_t}
        as the detail factors arrive, so every step also corrects the error left by the steps
        before it (the base's quantization error included)."""
        targets = self.targets(f_image, f_bases)
        if not self.carry:
            return targets
        n = self.schedule.n_factors
        chain = [f_image, *(f_bases or [])]
        return {0: targets[0], **{t: chain[t - 1] for t in range(1, n + 1)}}

    def forward(self, f_image: torch.Tensor, f_bases: list[torch.Tensor] | None = None):
        """Alg. 1 (tokens) and Alg. 2 (f_hat) in one pass, with losses for training."""
        targets = self.chain_targets(f_image, f_bases)
        chain_hat: dict[int, torch.Tensor] = {}  # sum of the phi terms of each chain
        if self.training and not bool(self.initialized):
            self.init_codebook(
                torch.cat([v.detach() for v in self.targets(f_image, f_bases).values()])
            )
        tokens, losses, step_mse = [], [], []
        f_hat_base = None
        self._recent = None  # restart candidates come from this batch only: exact resume
        for m, step in enumerate(self.schedule):
            t = step.factor  # 0 for base steps
            key = 0 if self.carry else t
            target = targets[t]
            hat = chain_hat.get(key, torch.zeros_like(target))
            rest = target.detach() - hat.detach()  # what is left to quantize (Alg. 1: f_B, f_D)
            z_in = resize(rest, (step.h, step.w))  # Alg. 1: interpolate(f_B, h_k, w_k)
            idx = self.nearest(z_in)
            if self.training:
                self._remember(z_in)
            term = self.step_term(idx, m)  # phi_k(interpolate(z_k, h_M, w_M))
            chain_hat[key] = hat = hat + term  # f_B <- f_B - phi_k(z_k), kept as f_hat instead
            losses.append(
                F.mse_loss(hat, target.detach()) + self.beta * F.mse_loss(hat.detach(), target)
            )
            step_mse.append(F.mse_loss(hat.detach(), target.detach()))
            tokens.append(idx)
            if m == self.schedule.n_base - 1:
                f_hat_base = sum(chain_hat.values())
        f_hat = sum(chain_hat.values())
        return QuantOutput(
            f_hat=self.pass_through(f_image, f_hat),
            f_hat_base=self.pass_through(targets[0], f_hat_base),
            tokens=tokens,
            vq_loss=torch.stack(losses).mean(),
            step_mse=torch.stack(step_mse),
        )

    def pass_through(self, f: torch.Tensor, f_hat: torch.Tensor) -> torch.Tensor:
        """What the decoder gets: f_hat's value, with the decoder's gradient passed straight to
        f (the encoder) and, for ``"cartlib"``, also to f_hat (codebook and phi convs). VAR
        (``"var"``): only to f. (B,C,h,w), (B,C,h,w) -> (B,C,h,w)"""
        out = f + (f_hat - f).detach()
        if self.straight_through == "cartlib":
            out = out + (f_hat - f_hat.detach())
        return out

    @torch.no_grad()
    def quantize_base(self, f_base: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """Alg. 1's base steps alone on a given base feature map f_B (B,C,h_M,w_M): r_1..r_upto
        (default: all B base steps), each (B,h_k,w_k). What encoding an image gives for them, so
        a base can be re-tokenized after an edit (recolouring) or for a patch (high resolution)."""
        upto = self.schedule.n_base if upto is None else upto
        if not 1 <= upto <= self.schedule.n_base:
            raise ValueError(f"upto={upto}: choose between 1 and {self.schedule.n_base} base steps")
        f_hat, tokens = None, []
        for m in range(upto):
            step = self.schedule[m]
            rest = f_base if f_hat is None else f_base - f_hat  # f_B - sum of phi terms
            tokens.append(self.nearest(resize(rest, (step.h, step.w))))
            f_hat = self.add_term(f_hat, tokens[-1], m)
        return tokens

    # ----------------------------------------------------------------------- Alg. 2
    def add_term(self, f_hat: torch.Tensor | None, idx: torch.Tensor, m: int) -> torch.Tensor:
        """Alg. 2, one step: f_hat + phi_m(interpolate(z_m, h_M, w_M)) (f_hat None: the first)."""
        term = self.step_term(idx, m)
        return term if f_hat is None else f_hat + term

    def accumulate(self, tokens: list[torch.Tensor], upto: int | None = None):
        """Alg. 2 step by step: yields f_hat = sum_{k <= m} phi_k(z_k) after steps m = 1..upto
        (default: every given token map). Each (B, C, h_M, w_M)."""
        upto = len(tokens) if upto is None else upto
        if not 1 <= upto <= self.schedule.n_steps or upto > len(tokens):
            raise ValueError(
                f"upto={upto}: choose between 1 and {min(len(tokens), self.schedule.n_steps)}"
            )
        f_hat = None
        for m in range(upto):
            f_hat = self.add_term(f_hat, tokens[m], m)
            yield f_hat

    def features(self, tokens: list[torch.Tensor], upto: int | None = None) -> torch.Tensor:
        """f_hat = sum_{k < upto} phi_k(z_k): the partial reconstruction after ``upto`` steps."""
        *_, f_hat = self.accumulate(tokens, upto)
        return f_hat

    def teacher_inputs(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """Transformer inputs for steps 2..M (VAR's teacher forcing): the accumulated f_hat of
        steps < m resampled to step m's size, flattened. -> (B, L - h_1 w_1, C)"""
        if self.schedule.n_steps == 1:  # one step: the start token is the only input
            return tokens[0].new_zeros(len(tokens[0]), 0, self.codebook.embedding_dim).float()
        sums = self.accumulate(tokens, self.schedule.n_steps - 1)
        return torch.cat([self.next_input(f, m) for m, f in enumerate(sums, 1)], dim=1)

    def next_input(self, f_hat: torch.Tensor, m: int) -> torch.Tensor:
        """The input tokens of step m from the accumulated f_hat: (B,C,H,W) -> (B, h_m w_m, C)."""
        step = self.schedule[m]
        return resize(f_hat, (step.h, step.w)).flatten(2).transpose(1, 2)

    # ----------------------------------------------------------------------- codebook care
    @torch.no_grad()
    def init_codebook(self, feats: torch.Tensor) -> None:
        """Initialise the codebook from random feature vectors of the first batch (all chains)."""
        vecs = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
        pick = torch.randint(len(vecs), (self.codebook_size,), device=vecs.device)
        self.codebook.weight.copy_(vecs[pick] + 1e-3 * torch.randn_like(vecs[pick]))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(self.codebook.weight.data, src=0)  # one codebook on every process
        self.initialized.fill_(True)

    @torch.no_grad()
    def _remember(self, z_in: torch.Tensor, keep: int = 1024) -> None:
        """Keep a random sample of this batch's quantizer inputs: dead-code restart candidates."""
        vecs = z_in.detach().permute(0, 2, 3, 1).reshape(-1, z_in.shape[1])
        vecs = vecs[torch.randperm(len(vecs), device=vecs.device)[:keep]]
        old = getattr(self, "_recent", None)
        self._recent = vecs if old is None else torch.cat([old, vecs])[-4 * keep :]

    @torch.no_grad()
    def restart_dead_codes(self, feats: torch.Tensor | None = None) -> int:
        """Replace codes unused since the last call by random inputs of the last batch (or
        ``feats`` (N,C)); reset the usage counts; return how many codes were restarted."""
        feats = getattr(self, "_recent", None) if feats is None else feats
        dead = (self.usage == 0).nonzero().flatten()
        if len(dead) and feats is not None and len(feats):
            pick = torch.randint(len(feats), (len(dead),), device=feats.device)
            self.codebook.weight[dead] = feats[pick].to(self.codebook.weight)
        self.usage.zero_()
        return len(dead)
