"""The evaluation protocol's sampling: rejection sampling ("-re" rows) and the presets' defaults
(cfg 1.5 on VAR's ramp, top-k 900, top-p 0.96, 50 images per class)."""

import pytest
import torch

from cartlib.config import DecomposeConfig, TokenizerConfig, load_preset
from cartlib.model import NextDetailTransformer
from cartlib.sample import generate
from cartlib.tokenizer import Tokenizer

V, CLASSES = 24, 5


@pytest.fixture(scope="module")
def tok():
    cfg = TokenizerConfig(
        channels=8, ch_mult=(1, 2), latent_channels=4, codebook_size=V, base_patch_nums=(1, 2, 4)
    )
    torch.manual_seed(1)
    return Tokenizer(cfg, DecomposeConfig(order=1), resolution=8).eval()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(2)
    m = NextDetailTransformer(tok.schedule, V, 4, num_classes=CLASSES, depth=2, width=32, heads=4)
    for p in m.parameters():
        p.data.add_(0.3 * torch.randn_like(p))  # class-dependent, peaked distributions
    return m.eval()


def brightness(images, labels):
    return images.mean((1, 2, 3))


def test_rejection_keeps_the_best_of_r_candidates_by_the_scorer(model, tok):
    labels, r = torch.tensor([0, 3, 4]), 4
    kw = dict(cfg=1.5, top_k=10, top_p=0.9, seed=7)
    best = generate(model, tok, labels, rejection=r, scorer=brightness, return_steps=True, **kw)
    cands = generate(model, tok, labels.repeat_interleave(r), return_steps=True, **kw)
    pick = brightness(cands.images, None).view(3, r).argmax(1) + torch.arange(3) * r
    assert torch.equal(best.images, cands.images[pick])
    assert all(torch.equal(a, b[pick]) for a, b in zip(best.tokens, cands.tokens))
    assert torch.equal(best.steps, cands.steps[:, pick])
    assert (brightness(best.images, None) >= brightness(cands.images, None).view(3, r).T).all()
    plain = generate(model, tok, labels, **kw)
    assert torch.equal(generate(model, tok, labels, rejection=1, **kw).images, plain.images)


def test_default_score_is_the_implicit_classifier_of_the_sampled_tokens(model, tok):
    labels = torch.tensor([1, 2, 2, 4])
    gen = generate(model, tok, labels, cfg=0.0, rejection=3, seed=3)
    q = tok.quantizer
    flat = torch.cat([t.flatten(1) for t in gen.tokens], 1)  # (B, L)

    def logp(lab):  # teacher-forced log p(tokens | lab), summed: independent of the cache
        logits = model(lab, q.teacher_inputs(gen.tokens))
        return logits.log_softmax(-1).gather(-1, flat[..., None]).sum((1, 2))

    want = logp(labels) - logp(torch.full_like(labels, CLASSES))
    torch.testing.assert_close(gen.log_ratio, want, atol=1e-4, rtol=1e-5)
    plain = generate(model, tok, labels, cfg=0.0, seed=3)
    assert plain.log_ratio is None  # no guidance, no rejection: the null class is not run
    with pytest.raises(ValueError, match="rejection"):
        generate(model, tok, labels, rejection=0)


def test_full_scale_presets_sample_with_the_papers_fid_setting(model, tok):
    s = load_preset("cart-d30-256").sample
    assert (s.guidance, s.cfg_schedule, s.top_k, s.top_p, s.per_class) == (
        1.5, "linear", 900, 0.96, 50
    )  # fmt: skip
    assert load_preset("var-d16-256").sample == s
    smoke = load_preset("smoke").sample  # the notebooks' own defaults, unchanged
    assert (smoke.guidance, smoke.top_k, smoke.top_p, smoke.rejection) == (2.0, 0, 1.0, 1)
    re = load_preset("cart-d30-256", sample={"rejection": 4}).sample.generate_kwargs()
    out = generate(model, tok, [0, 1], seed=0, **re)  # top_k 900 > V: no filtering
    assert out.images.shape == (2, 3, 8, 8) and out.log_ratio.shape == (2,)
