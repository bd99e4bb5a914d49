"""Applications and the two extra decompositions: intrinsic (Retinex), specular (recursive
specularity factorization), training-free high resolution, super-resolution, inpainting."""

import pytest
import torch
import torch.nn.functional as F

from cartlib.apps.edit import (
    hue_rotate,
    hue_shift,
    inpaint,
    intrinsic_factors,
    keep_masks,
    recolour,
    recolour_tokens,
    relight,
)
from cartlib.apps.highres import compare_upscaling, high_resolution, seam_score
from cartlib.apps.superres import lr_prefix, super_resolve
from cartlib.config import DecomposeConfig, TokenizerConfig
from cartlib.decompose.factors import LOG_OFFSET, Factorization
from cartlib.decompose.intrinsic import forward_differences, intrinsic, poisson_neumann
from cartlib.decompose.specular import specular
from cartlib.model import NextDetailTransformer
from cartlib.sample import generate
from cartlib.tokenizer import Tokenizer


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]).double())[0, 1])


def mondrian(b: int, size: int, lo: float, hi: float, seed: int = 0) -> torch.Tensor:
    """Piecewise-constant colour images (b, 3, size, size): rectangles of random colours."""
    g = torch.Generator().manual_seed(seed)
    out = lo + (hi - lo) * torch.rand(b, 3, 1, 1, generator=g).expand(b, 3, size, size).clone()
    for i in range(b):
        for _ in range(12):
            y0, x0 = torch.randint(0, size - 8, (2,), generator=g).tolist()
            hh, ww = torch.randint(6, size // 2, (2,), generator=g).tolist()
            out[i, :, y0 : y0 + hh, x0 : x0 + ww] = lo + (hi - lo) * torch.rand(
                3, 1, 1, generator=g
            )
    return out


def smooth_field(b: int, size: int, seed: int = 1) -> torch.Tensor:
    """A smooth field in [0, 1] (b, 1, size, size): a tilted plane plus a wide bump."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for _ in range(b):
        a, c, cy, cx = torch.rand(4, generator=g).tolist()
        f = a * x + (1 - a) * y + torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 0.1)
        out.append((f - f.min()) / (f.max() - f.min()))
    return torch.stack(out)[:, None]


# ------------------------------------------------------------------------------------ intrinsic
def test_intrinsic_reconstructs_the_image_by_exponentiation():
    x = torch.rand(2, 3, 24, 20, generator=torch.Generator().manual_seed(0)) * 0.95 + 0.05
    split = intrinsic(x)
    assert split.log_shading.shape == (2, 1, 24, 20)
    assert (split.reconstruct() - x).abs().max() < 1e-6


def test_intrinsic_recovers_albedo_and_shading_of_a_mondrian():
    albedo = mondrian(2, 64, 0.15, 0.9)
    log_s = 0.8 * smooth_field(2, 64) - 0.4  # shading varies by a factor e^0.8 = 2.2
    split = intrinsic(albedo * log_s.exp())
    for i in range(2):  # up to scale: correlation of the logs
        assert corr(split.log_shading[i], log_s[i]) > 0.9
        assert corr(split.log_albedo[i], albedo[i].log()) > 0.9
    assert split.log_shading.mean().abs() < 1e-6  # the scale convention: mean log S = 0


def test_poisson_integration_matches_a_dense_least_squares_solve():
    """Independent reference: numpy's least squares on the explicit forward-difference matrix
    (its minimum-norm solution is the zero-mean one, as the constant is in D's null space)."""
    import numpy as np

    h, w = 7, 9
    g = torch.Generator().manual_seed(3)
    gy, gx = torch.randn(1, 1, h - 1, w, generator=g), torch.randn(1, 1, h, w - 1, generator=g)
    got = poisson_neumann(gy, gx)[0, 0].numpy()

    def diff(n):
        return np.eye(n - 1, n, 1) - np.eye(n - 1, n)

    d = np.vstack([np.kron(diff(h), np.eye(w)), np.kron(np.eye(h), diff(w))])
    rhs = np.concatenate([gy.numpy().ravel(), gx.numpy().ravel()])
    want = np.linalg.lstsq(d, rhs, rcond=None)[0].reshape(h, w)
    np.testing.assert_allclose(got, want, atol=1e-9)
    s = torch.from_numpy(got)[None, None]
    dy, dx = forward_differences(s)  # an exact gradient field is integrated exactly
    torch.testing.assert_close(poisson_neumann(dy, dx), s, atol=1e-9, rtol=0)


# ------------------------------------------------------------------------------------- specular
def test_specular_factors_sum_exactly_and_are_non_negative():
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    dec = specular(x, order=4)
    assert (dec.reconstruct() - x).abs().max() < 1e-6
    assert min(float(e.min()) for e in dec.factors) >= 0 and float(dec.diffuse.min()) >= 0
    for k, b in enumerate(dec.bases):  # A_k = I - E_1 - ... - E_k
        torch.testing.assert_close(b, x - sum(dec.factors[: k + 1]), atol=1e-6, rtol=0)
    brightness = [float(dec.reconstruct(k).mean()) for k in range(5)]
    assert brightness == sorted(brightness)  # each factor adds light


def test_first_specular_factor_finds_a_known_highlight():
    """Dichromatic image: diffuse = Mondrian albedo x smooth shading; specular = a white lobe."""
    size = 64
    diffuse = mondrian(2, size, 0.1, 0.45) * (0.5 + 0.5 * smooth_field(2, size))
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    lobe = []
    for cy, cx in ((20, 40), (44, 22)):
        lobe.append(0.7 * torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * 6.0**2)))
    lobe = torch.stack(lobe)[:, None]  # (2, 1, H, W)
    image = (diffuse + lobe).clamp(max=1)
    highlight = lobe[:, 0] > 0.35  # the lobe's half-maximum region
    e1 = specular(image, order=4).factors[0].norm(dim=1) > 0
    iou = (e1 & highlight).sum((1, 2)) / (e1 | highlight).sum((1, 2))
    assert (iou > 0.5).all(), iou


# ---------------------------------------------------------- decompositions in the tokenizer
def tiny_tokenizer(kind: str, order: int, depth: int = 1, resolution: int = 16):
    cfg = TokenizerConfig(
        channels=8, ch_mult=(1, 2), latent_channels=4, codebook_size=16,
        base_patch_nums=(1, 2, 4, 8), depth_per_factor=depth,
    )  # fmt: skip
    torch.manual_seed(0)
    return Tokenizer(cfg, DecomposeConfig(order=order, kind=kind), resolution).eval()


def test_decomposition_kinds_drive_the_schedule_and_the_model_space():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    tok = tiny_tokenizer("intrinsic", 1, depth=3)
    assert [s.kind for s in tok.schedule] == ["base"] * 4 + ["detail"] * 3  # albedo, shading
    assert tok.factors.step_labels(tok.schedule)[-1] == "shading"
    torch.testing.assert_close(
        tok.factors.from_model(tok.factors.to_model(x)), x, atol=1e-5, rtol=0
    )
    bases = tok.decompose(x)  # log albedo, normalised
    shading = tok.factors.to_model(x) - bases[:, 0]  # = log S / L: one grey channel
    torch.testing.assert_close(shading, shading[:, :1].expand_as(shading), atol=1e-5, rtol=0)
    out = tok(x)
    assert out.target_base.shape == (2, 3, 16, 16) and out.recon.shape == (2, 3, 16, 16)
    spec = tiny_tokenizer("specular", 4)
    assert spec.schedule.n_factors == 4 and spec.schedule.n_steps == 8
    torch.testing.assert_close(spec.decompose(x)[:, -1], specular(x, 4).diffuse)
    with pytest.raises(ValueError, match="one detail factor"):
        tiny_tokenizer("intrinsic", 2)
    with pytest.raises(ValueError, match="choose one of"):
        Factorization("retinex", 1)


def test_quantize_base_gives_the_base_tokens_of_encode():
    tok = tiny_tokenizer("specular", 2)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    tokens = tok.encode(x)
    f_base = tok.encoder(tok.decompose(x)[:, -1])
    got = tok.quantizer.quantize_base(f_base)
    assert all(torch.equal(a, b) for a, b in zip(got, tokens[: tok.schedule.n_base], strict=True))


# ------------------------------------------------------------------------------ generation apps
def tiny_model(tok, num_classes=3):
    torch.manual_seed(2)
    m = NextDetailTransformer(
        tok.schedule, tok.quantizer.codebook_size, 4, num_classes, depth=1, width=16, heads=2
    )
    for p in m.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return m.eval()


class RampModel(torch.nn.Module):
    """Test double of the transformer: every token is the column index inside its window, so
    windows placed side by side without overlap leave a jump at each border."""

    def __init__(self, schedule, vocab):
        super().__init__()
        self.schedule, self.num_classes, self.vocab = schedule, 1, vocab
        self.class_emb = torch.nn.Embedding(2, 4)
        self.m = 0

    def new_caches(self):
        return []

    def step_tokens(self, m, cond, inputs):
        self.m = m
        return torch.zeros(len(cond), self.schedule[m].numel, 4)

    def forward_step(self, x, cond, caches):
        s = self.schedule[self.m]
        col = torch.arange(s.w).repeat(s.h)  # (h*w,)
        return F.one_hot(col, self.vocab).float()[None].expand(len(x), -1, -1) * 10


def test_high_resolution_size_and_overlap_removes_seams():
    tok = tiny_tokenizer("base_detail", 1)
    q = tok.quantizer
    for phi in q.phis:
        phi.resi = 0.0  # phi(z) = z: detail features are the ramp itself
    q.codebook.weight.data = torch.arange(16.0)[:, None].expand(16, 4) / 16
    model = RampModel(tok.schedule, 16)
    kw = dict(scale=2, cfg=0.0, temperature=0.0)
    nov = high_resolution(model, tok, [0, 0], overlap=False, **kw)
    ov = high_resolution(model, tok, [0, 0], overlap=True, **kw)
    assert nov.images.shape == ov.images.shape == (2, 3, 32, 32)
    assert (nov.n_patches, ov.n_patches) == (4, 9)
    s_nov, s_ov = seam_score(nov.detail, 8), seam_score(ov.detail, 8)
    assert (s_nov > 2).all() and (s_ov < s_nov).all(), (s_nov, s_ov)
    assert (seam_score(ov.images, 16, 2) < seam_score(nov.images, 16, 2)).all()
    both = compare_upscaling(model, tok, [0, 0], **kw)
    assert set(both.images) == {"bilinear", "base only", "NOV", "OV"}
    torch.testing.assert_close(both.images["OV"], ov.images)  # one generation, four upscalings
    assert (both.detail_seams["OV"] < both.detail_seams["NOV"]).all()


def test_super_resolution_keeps_the_given_tokens():
    tok = tiny_tokenizer("base_detail", 1)
    model = tiny_model(tok)
    lr = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    sr = super_resolve(model, tok, lr, target=16)
    assert sr.n_prefix == 3  # scales 1, 2, 4 fit the 4x4 latent of an 8 px image
    assert all(torch.equal(a, b) for a, b in zip(sr.prefix, lr_prefix(tok, lr), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(sr.tokens, sr.prefix, strict=False))
    assert sr.images.shape == (2, 3, 16, 16)
    beyond = super_resolve(model, tok, F.interpolate(lr, size=16), target=32)
    assert beyond.n_prefix == 4 and beyond.images.shape == (2, 3, 32, 32)


def test_inpainting_keeps_tokens_and_pixels_outside_the_mask():
    tok = tiny_tokenizer("base_detail", 1)
    model = tiny_model(tok)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    region = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    region[:, :, 4:12, 8:16] = True
    out = inpaint(model, tok, images, region, seed=0)
    for new, old, keep in zip(out.tokens, out.original, out.keep, strict=True):
        assert torch.equal(new[keep], old[keep])
    assert not out.keep[-1].all() and out.keep[0].all()  # fine maps regenerated, 1x1 kept
    assert any(not torch.equal(n, o) for n, o in zip(out.tokens, out.original, strict=True))
    outside = (~region).expand_as(images)
    assert torch.equal(out.images[outside], out.reconstruction[outside])
    with pytest.raises(ValueError, match="together"):
        generate(model, tok, [0], forced=out.original)


def test_keep_masks_follow_token_footprints():
    tok = tiny_tokenizer("base_detail", 1)
    region = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    region[..., 0:3, 0:3] = True  # touches one 2x2-pixel token of the 8x8 latent fully, 3 partly
    keep = keep_masks(region, tok.schedule, 2)
    assert int((~keep[-1]).sum()) == 4 and bool(keep[0].all()) and bool(keep[1].all())


def test_recolour_and_relight_edit_only_their_factor():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    tok = tiny_tokenizer("intrinsic", 1, depth=2)
    tokens = tok.encode(x)
    images, new = recolour_tokens(tok, tokens, 90.0)
    n_base = tok.schedule.n_base
    assert images.shape == x.shape
    assert all(torch.equal(a, b) for a, b in zip(new[n_base:], tokens[n_base:], strict=True))
    # the pixel route: albedo and shading as the tokens decode them, recomposed
    full = tok.decode(tok.features(tokens))
    log_a, log_s = intrinsic_factors(tok, tokens)
    torch.testing.assert_close(((log_a + log_s).exp() - LOG_OFFSET).clamp(0, 1), full)
    torch.testing.assert_close(recolour(tok, tokens, 0.0), full)
    left = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    left[..., :8] = True
    part = recolour(tok, tokens, 90.0, region=left)
    torch.testing.assert_close(part[..., 8:], full[..., 8:])  # outside the region: untouched
    a_turned = hue_rotate(log_a.exp(), 90.0)
    inside = (a_turned > LOG_OFFSET / 4).all(1, keepdim=True) & left  # no clamp at the log
    inside &= (part > 0).all(1, keepdim=True) & (part < 1).all(1, keepdim=True)
    expected = log_s.exp() * a_turned - LOG_OFFSET  # the turned albedo times the shading
    torch.testing.assert_close(part[inside.expand_as(part)], expected[inside.expand_as(part)])
    turned = hue_rotate(torch.rand(1, 3, 4, 4), 40.0)
    assert abs(float(hue_shift(hue_rotate(turned, -40.0), turned)) - 40) < 1e-3
    spec = tiny_tokenizer("specular", 2)
    tokens = spec.encode(x)
    full = spec.decode(spec.features(tokens))
    torch.testing.assert_close(relight(spec, tokens, 2), full)
    base = spec.decode(spec.features(tokens, spec.schedule.n_base))
    torch.testing.assert_close(relight(spec, tokens, 0), base)
    with pytest.raises(ValueError, match="kind='specular'"):
        relight(tok, tokens, 1)
