"""Which parameters the decoder's gradient reaches through the quantizer (straight_through):
"cartlib" = encoder, codebook and phi convs; "var" = the encoder only, as VAR's VQ-VAE
(its quant.py ``VectorQuantizer2.forward`` returns f_hat.data - f.detach() + f)."""

import pytest
import torch

from cartlib.config import DecomposeConfig, TokenizerConfig
from cartlib.tokenizer import Tokenizer
from cartlib.tokenizer.quantize import resolve_straight_through

SMALL = {"channels": 8, "ch_mult": (1, 2), "latent_channels": 4, "codebook_size": 16,
         "base_patch_nums": (1, 2, 4)}  # fmt: skip
VAR_SMALL = {"arch": "var", "channels": 32, "ch_mult": (1, 2), "latent_channels": 4,
             "codebook_size": 16, "base_patch_nums": (1, 2, 4), "phi_share": 4,
             "quantizer": "multiscale"}  # fmt: skip


def pair(settings: dict, order: int):
    """Two tokenizers with the same weights, one per mode, and a batch (images, bases)."""
    torch.manual_seed(0)
    make = {
        mode: Tokenizer(
            TokenizerConfig(**settings, straight_through=mode), DecomposeConfig(order=order), 8
        ).train()
        for mode in ("cartlib", "var")
    }
    make["var"].load_state_dict(make["cartlib"].state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 8, 8, generator=g)
    bases = torch.rand(3, order, 3, 8, 8, generator=g) if order else None
    return make, x, bases


def forward(tok: Tokenizer, x, bases):
    torch.manual_seed(2)  # the first training pass initialises the codebook from random features
    return tok(x, bases)


def recon_loss(out) -> torch.Tensor:
    """The decoder's losses only (no VQ loss): full and base-only reconstruction."""
    loss = (out.recon - out.target).pow(2).mean()
    if out.recon_base is not None:
        loss = loss + (out.recon_base - out.target_base).pow(2).mean()
    return loss


def grads(tok: Tokenizer, loss: torch.Tensor) -> dict[str, torch.Tensor | None]:
    tok.zero_grad(set_to_none=True)
    loss.backward()
    return {k: p.grad for k, p in tok.named_parameters()}


def quantizer_grads(g: dict) -> dict:
    return {k: v for k, v in g.items() if k.startswith("quantizer.")}


def first(g: dict, prefix: str) -> str:
    """The first parameter of a module (``encoder.``: the input conv)."""
    return next(name for name in g if name.startswith(prefix))


def nonzero(t: torch.Tensor | None) -> bool:
    return t is not None and bool(t.abs().sum() > 0)


CASES = [
    pytest.param(SMALL, 2, id="cartlib-arch-order2"),
    pytest.param(VAR_SMALL, 0, id="var-arch"),
]


@pytest.mark.parametrize("settings, order", CASES)
def test_forward_values_are_the_same_in_both_modes(settings, order):
    toks, x, bases = pair(settings, order)
    a, b = (forward(toks[m], x, bases) for m in ("cartlib", "var"))
    assert torch.equal(a.recon, b.recon)
    assert torch.equal(a.quant.f_hat, b.quant.f_hat)
    assert torch.equal(a.quant.f_hat_base, b.quant.f_hat_base)
    assert torch.equal(a.quant.vq_loss, b.quant.vq_loss)
    assert all(torch.equal(r, s) for r, s in zip(a.quant.tokens, b.quant.tokens, strict=True))


@pytest.mark.parametrize("settings, order", CASES)
def test_var_mode_sends_the_decoders_gradient_to_the_encoder_only(settings, order):
    toks, x, bases = pair(settings, order)
    by_mode = {m: grads(t, recon_loss(forward(t, x, bases))) for m, t in toks.items()}
    var, cart = by_mode["var"], by_mode["cartlib"]
    assert not any(nonzero(g) for g in quantizer_grads(var).values())  # codebook and phi convs
    assert nonzero(cart["quantizer.codebook.weight"])
    q = toks["cartlib"].quantizer
    used = {list(q.phis).index(q.phi(m)) for m in range(q.schedule.n_steps)}  # phi_share: not all
    assert all(nonzero(cart[f"quantizer.phis.{i}.conv.weight"]) for i in used)
    # the encoder (quant_conv included) and the decoder get the same gradient in both modes
    others = [name for name in var if not name.startswith("quantizer.")]
    assert all(torch.equal(var[name], cart[name]) for name in others)
    assert nonzero(var[first(var, "encoder.")]) and nonzero(var[first(var, "decoder.")])


def test_cartlib_mode_gradient_equals_alg2_recomputed_from_the_tokens():
    """Independent reference: with an upstream gradient G on f_hat, "cartlib" gives the codebook
    and phi convs the gradient of <G, sum_k phi_k(z_k)> (Alg. 2 rebuilt from the tokens) and the
    encoder that of <G, f_I>; "var" gives the same to the encoder and nothing to the rest."""
    toks, x, bases = pair(SMALL, 2)
    up = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    for mode, tok in toks.items():
        out = forward(tok, x, bases)
        got = grads(tok, (out.quant.f_hat * up).sum())
        q = tok.quantizer
        want = grads(tok, (q.features(out.quant.tokens) * up).sum())
        for name in quantizer_grads(got):
            if mode == "cartlib":
                torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
            else:
                assert got[name] is None, name
        enc = grads(tok, (tok._encode_all(x, bases)[1] * up).sum())  # <G, f_I>
        name = first(got, "encoder.")
        torch.testing.assert_close(got[name], enc[name])


def test_vq_loss_still_trains_codebook_and_phi_in_var_mode():
    toks, x, bases = pair(SMALL, 2)
    g = grads(toks["var"], forward(toks["var"], x, bases).quant.vq_loss)
    assert nonzero(g["quantizer.codebook.weight"])
    assert nonzero(g["quantizer.phis.0.conv.weight"])
    assert nonzero(g[first(g, "encoder.")])  # the commitment term


def test_none_resolves_by_arch_and_bad_values_are_refused():
    assert resolve_straight_through(None, "cartlib") == "cartlib"
    assert resolve_straight_through(None, "var") == "var"
    assert resolve_straight_through("cartlib", "var") == "cartlib"
    assert resolve_straight_through("var", "cartlib") == "var"
    with pytest.raises(ValueError, match="straight_through='vq'"):
        resolve_straight_through("vq", "cartlib")


def test_tokenizers_default_by_arch():
    def mode(settings: dict, order: int, **kw) -> str:
        tok = Tokenizer(TokenizerConfig(**settings, **kw), DecomposeConfig(order=order), 8)
        return tok.quantizer.straight_through

    assert mode(SMALL, 2) == "cartlib"
    assert mode(VAR_SMALL, 0) == "var"  # arch var, channels 32
    assert mode(VAR_SMALL, 0, straight_through="cartlib") == "cartlib"
    assert mode(SMALL, 2, straight_through="var") == "var"
