"""The tokenizer: encoder E, schedule-driven quantizer Q (Alg. 1/2) and decoder D, one interface.

    tokens = tok.encode(images[, bases])      # Alg. 1 -> [r_1 .. r_M], r_k (B, h_k, w_k)
    f_hat  = tok.features(tokens, upto=m)     # Alg. 2 partial sum after m steps (B, C, h, w)
    images = tok.decode(f_hat)                # D(f_hat), (B, 3, H, W) in [0, 1]

The base-detail quantizer needs the bases B_1..B_n of every image (Eq. 7); ``encode`` computes them
when they are not given (training passes cached ones). Which decomposition gives them is
``DecomposeConfig.kind`` (:mod:`cartlib.decompose.factors`): Ambrosio-Tortorelli base/detail,
intrinsic albedo/shading (learned in the log domain, decoded by exponentiation) or specular.
Images in and out are always I in [0, 1]; bases are in the decomposition's model space.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cartlib.config import DecomposeConfig, TokenizerConfig, decomposition_order
from cartlib.decompose.factors import Factorization
from cartlib.schedule import TokenSchedule
from cartlib.tokenizer.quantize import (
    QUANTIZERS,
    QuantOutput,
    ScheduleQuantizer,
    resolve_straight_through,
)
from cartlib.tokenizer.vqvae import ARCHS, downsample_factor


@dataclass
class TokenizerOutput:
    recon: torch.Tensor  # D(f_hat) (B,3,H,W)
    recon_base: torch.Tensor | None  # D(f_hat of the base steps) (B,3,H,W), or None at order 0
    quant: QuantOutput
    target: torch.Tensor  # what recon approximates: the image in model space (B,3,H,W)
    target_base: torch.Tensor | None  # what recon_base approximates: B_n in model space


class Tokenizer(nn.Module):
    def __init__(self, cfg: TokenizerConfig, decompose: DecomposeConfig, resolution: int):
        super().__init__()
        if cfg.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer={cfg.quantizer!r}: choose one of {', '.join(QUANTIZERS)}")
        if cfg.arch not in ARCHS:
            raise ValueError(f"arch={cfg.arch!r}: choose one of {', '.join(ARCHS)}")
        down = downsample_factor(cfg.ch_mult)
        if resolution % down:
            raise ValueError(
                f"resolution={resolution} is not divisible by the {down}x downsampling of "
                f"ch_mult={cfg.ch_mult}; choose a multiple of {down}"
            )
        self.schedule = TokenSchedule.from_config(cfg, decomposition_order(cfg, decompose))
        latent = resolution // down
        if self.schedule.full_hw != (latent, latent):
            raise ValueError(
                f"the last base scale {self.schedule.full_hw[0]} must equal the latent size "
                f"{latent} (= resolution {resolution} / {down}); set base_patch_nums to end at "
                f"{latent}"
            )
        self.cfg, self.decompose_cfg, self.resolution = cfg, decompose, resolution
        self.factors = Factorization.from_config(decompose, self.schedule.n_factors)
        encoder, decoder = ARCHS[cfg.arch]
        self.encoder = encoder(cfg.channels, cfg.ch_mult, cfg.latent_channels)
        self.decoder = decoder(cfg.channels, cfg.ch_mult, cfg.latent_channels)
        c = cfg.latent_channels  # VAR's 3x3 convs between encoder, quantizer and decoder
        var = cfg.arch == "var"
        self.quant_conv = nn.Conv2d(c, c, 3, padding=1) if var else nn.Identity()
        self.post_quant_conv = nn.Conv2d(c, c, 3, padding=1) if var else nn.Identity()
        self.quantizer = ScheduleQuantizer(
            self.schedule,
            cfg.codebook_size,
            cfg.latent_channels,
            cfg.beta,
            cfg.phi_share,
            cfg.phi_kernel,
            cfg.detail_carry,
            resolve_straight_through(cfg.straight_through, cfg.arch),
        )

    @property
    def order(self) -> int:
        return self.schedule.n_factors

    def _encode_all(self, images: torch.Tensor, bases: torch.Tensor | None):
        """E(X) and E(B_k) (Eq. 7) in one batched pass, X = the images in model space.
        bases: (B, n, 3, H, W) in model space, or None. -> (X, f_X, [f_B1 .. f_Bn] or None)"""
        n = self.order
        x = self.factors.to_model(images)
        if n == 0:
            return x, self.encode_features(x), None
        if bases is None:
            bases = self.decompose(images)
        if bases.shape[1] != n:
            raise ValueError(
                f"got {bases.shape[1]} bases per image, the tokenizer has order {n}: pass the "
                f"bases of base_detail(x, order={n})"
            )
        b = images.shape[0]
        stacked = torch.cat([x[:, None], bases.to(x)], 1).flatten(0, 1)
        feats = self.encode_features(stacked).unflatten(0, (b, n + 1))
        return x, feats[:, 0], [feats[:, k] for k in range(1, n + 1)]

    @torch.no_grad()
    def init_codebook(self, images: torch.Tensor, bases: torch.Tensor | None, parts: list[slice]):
        """Initialise the codebook (:meth:`ScheduleQuantizer.init_codebook`) from a first batch
        encoded in ``parts`` (the training step's micro-batches): the same vectors, in the same
        order, as one pass over the whole batch would give."""
        chains = []
        for p in parts:
            b = None if bases is None else bases[p]
            if self.order > 0 and b is None:
                b = self.decompose(images[p])
            _, f_image, f_bases = self._encode_all(images[p], b)
            chains.append(self.quantizer.targets(f_image, f_bases))
        feats = [torch.cat([c[k] for c in chains]) for k in chains[0]]  # chain-major, as one pass
        self.quantizer.init_codebook(torch.cat(feats))

    def encode_features(self, images: torch.Tensor) -> torch.Tensor:
        """f = E(I) (Eq. 7), (B,3,H,W) -> (B,C,h,w) (VAR: then ``quant_conv``)."""
        return self.quant_conv(self.encoder(images))

    def decode_features(self, f_hat: torch.Tensor) -> torch.Tensor:
        """D(f_hat), unclamped (VAR: ``post_quant_conv`` first). (B,C,h,w) -> (B,3,H,W)"""
        return self.decoder(self.post_quant_conv(f_hat))

    @torch.no_grad()
    def decompose(self, images: torch.Tensor) -> torch.Tensor:
        """B_1..B_n of each image with this tokenizer's decomposition (kind and settings), in
        model space. -> (B,n,3,H,W)"""
        return self.factors.bases(images)

    def forward(self, images: torch.Tensor, bases: torch.Tensor | None = None) -> TokenizerOutput:
        """Training pass: reconstructions in model space (unclamped) and their targets."""
        if self.order > 0 and bases is None:
            bases = self.decompose(images)
        x, f_image, f_bases = self._encode_all(images, bases)
        q = self.quantizer(f_image, f_bases)
        recon = self.decode_features(q.f_hat)
        recon_base = self.decode_features(q.f_hat_base) if self.order > 0 else None
        target_base = bases[:, -1].to(x) if self.order > 0 else None
        return TokenizerOutput(recon, recon_base, q, x, target_base)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, bases: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Alg. 1: the token maps r_1..r_M of ``images`` (bases computed when not given)."""
        was = self.training
        self.eval()
        _, f_image, f_bases = self._encode_all(images, bases)
        tokens = self.quantizer(f_image, f_bases).tokens
        self.train(was)
        return tokens

    def features(self, tokens: list[torch.Tensor], upto: int | None = None) -> torch.Tensor:
        return self.quantizer.features(tokens, upto)

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        """D(f_hat) mapped back to images in [0, 1] (intrinsic: by exponentiation)."""
        return self.factors.from_model(self.decode_features(f_hat).clamp(0, 1))

    @torch.no_grad()
    def partial_reconstructions(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """Decoded image after every step (base scales, then each detail). -> (M,B,3,H,W)"""
        return torch.stack([self.decode(f) for f in self.quantizer.accumulate(tokens)])


@torch.no_grad()
def reconstruction_report(
    tok: Tokenizer, images: torch.Tensor, bases: torch.Tensor | None = None, batch_size: int = 128
) -> dict:
    """Held-out reconstruction numbers of a tokenizer (Figure 11 and notebook 02):

    * ``mse_per_depth``: MSE of D(f_hat after k steps) against the image, k = 1..M;
    * ``mse``: the full reconstruction's MSE; ``base_mse``: base-only reconstruction vs B_n
      (base-detail only);
    * ``usage``: fraction of the V codes used; ``perplexity`` of the code distribution."""
    device = next(tok.parameters()).device
    sums = torch.zeros(tok.schedule.n_steps, dtype=torch.float64)
    base_sum, counts = 0.0, torch.zeros(tok.quantizer.codebook_size, dtype=torch.float64)
    n = 0
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].float().to(device)
        b = bases[i : i + batch_size].float().to(device) if bases is not None else None
        tokens = tok.encode(x, b)
        for r in tokens:
            counts += torch.bincount(r.flatten().cpu(), minlength=len(counts)).double()
        steps = tok.partial_reconstructions(tokens)  # (M,B,3,H,W)
        sums += ((steps - x[None]) ** 2).flatten(2).mean(-1).sum(-1).double().cpu()
        if b is not None and tok.order > 0:
            recon_base = steps[tok.schedule.n_base - 1]
            target = tok.factors.from_model(b[:, -1])  # B_n as an image
            base_sum += float(((recon_base - target) ** 2).flatten(1).mean(-1).sum())
        n += len(x)
    p = counts / counts.sum()
    nz = p[p > 0]
    report = {
        "mse_per_depth": (sums / n).tolist(),
        "mse": float(sums[-1] / n),
        "usage": float((counts > 0).double().mean()),
        "perplexity": float(torch.exp(-(nz * nz.log()).sum())),
    }
    if bases is not None and tok.order > 0:
        report["base_mse"] = base_sum / n
    return report
