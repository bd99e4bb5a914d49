"""The tokenizer's compound loss (Eq. 2) and its patch discriminator.

    L = w_rec ||I - I_hat||^2 + ||f - f_hat||^2 (+ beta commitment, inside the quantizer)
        + w_lpips L_p(I_hat, I) + w_gan L_G(I_hat) + w_base ||D(f_hat_base) - B_n||^2

``w_base`` supervises the base-only partial reconstruction against B_n, so that the image decoded
from the base tokens alone *is* the piecewise-smooth base the paper shows in Figure 1 (the paper is
silent on this; notebook 02 measures the effect). L_G is the hinge loss against a PatchGAN
discriminator, switched on after ``gan_start`` steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cartlib.config import TokenizerConfig
from cartlib.tokenizer.tokenizer import TokenizerOutput


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix/VQGAN): a map of real/fake logits over overlapping patches."""

    def __init__(self, channels: int = 32, n_layers: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for _ in range(1, n_layers):
            layers += [nn.Conv2d(c, 2 * c, 4, 2, 1), nn.GroupNorm(8, 2 * c), nn.LeakyReLU(0.2)]
            c *= 2
        layers += [nn.Conv2d(c, c, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(c, 1, 3, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images * 2 - 1)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


class CompoundLoss(nn.Module):
    """Eq. 2 with every weight a TokenizerConfig parameter. ``perceptual`` is a module
    d(x, y) -> (B,) (see cartlib.perceptual) or None when w_lpips == 0."""

    def __init__(self, cfg: TokenizerConfig, perceptual: nn.Module | None = None):
        super().__init__()
        if cfg.w_lpips > 0 and perceptual is None:
            raise ValueError("w_lpips > 0 needs a perceptual model (cartlib.perceptual)")
        self.cfg = cfg
        self.perceptual = perceptual
        self.disc = PatchDiscriminator() if cfg.w_gan > 0 else None

    def gan_on(self, step: int) -> bool:
        return self.disc is not None and step >= self.cfg.gan_start

    def generator_loss(
        self, out: TokenizerOutput, images: torch.Tensor, base: torch.Tensor | None, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        rec = F.mse_loss(out.recon, images)
        loss = cfg.w_rec * rec + out.quant.vq_loss
        logs = {"rec": rec.item(), "vq": out.quant.vq_loss.item()}
        if cfg.w_lpips > 0:
            p = self.perceptual(out.recon, images).mean()
            loss = loss + cfg.w_lpips * p
            logs["lpips"] = p.item()
        if cfg.w_base > 0 and out.recon_base is not None and base is not None:
            b = F.mse_loss(out.recon_base, base)
            loss = loss + cfg.w_base * b
            logs["base"] = b.item()
        if self.gan_on(step):
            g = -self.disc(out.recon).mean()
            loss = loss + cfg.w_gan * g
            logs["gan_g"] = g.item()
        logs["loss"] = loss.item()
        return loss, logs

    def discriminator_loss(self, recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return hinge_d_loss(self.disc(images), self.disc(recon.detach()))
