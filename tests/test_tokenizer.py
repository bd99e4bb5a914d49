"""Algorithms 1 and 2 of the paper, checked against independent re-derivations."""

import pytest
import torch
import torch.nn.functional as F

from cartlib.config import DecomposeConfig, TokenizerConfig
from cartlib.schedule import TokenSchedule
from cartlib.tokenizer import ScheduleQuantizer, Tokenizer


def identity_phi(q: ScheduleQuantizer) -> ScheduleQuantizer:
    for phi in q.phis:
        phi.resi = 0.0  # phi(z) = z
    return q.eval()


def codebook_maps(codebook: torch.Tensor, b: int, h: int, w: int, g: torch.Generator):
    idx = torch.randint(len(codebook), (b, h, w), generator=g)
    return idx, codebook[idx].permute(0, 3, 1, 2)


def test_alg1_then_alg2_is_exact_on_an_identity_codebook_path():
    """Features built from codebook vectors: Alg. 1 recovers every token and Alg. 2 gives f_I."""
    g = torch.Generator().manual_seed(0)
    sched = TokenSchedule.cart((8,), n_factors=2, depth_per_factor=1)  # B_2, then D_2, D_1
    q = identity_phi(ScheduleQuantizer(sched, codebook_size=16, dim=4))
    cb = q.codebook.weight.data = torch.randn(16, 4, generator=g)
    r_base, f_b2 = codebook_maps(cb, 2, 8, 8, g)
    r_d2, f_d2 = codebook_maps(cb, 2, 8, 8, g)
    r_d1, f_d1 = codebook_maps(cb, 2, 8, 8, g)
    f_b1 = f_b2 + f_d2  # B_{k-1} = B_k + D_k
    f_i = f_b1 + f_d1
    out = q(f_i, [f_b1, f_b2])
    assert [t.shape for t in out.tokens] == [(2, 8, 8)] * 3
    for got, want in zip(out.tokens, (r_base, r_d2, r_d1)):
        assert torch.equal(got, want)
    torch.testing.assert_close(out.f_hat, f_i, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.f_hat_base, f_b2, atol=1e-6, rtol=0)
    torch.testing.assert_close(q.features(out.tokens), f_i, atol=1e-6, rtol=0)


def test_detail_targets_telescope_back_to_f_image():
    """Eq. 8: f_{B_n} + sum_t (f_{B_{t-1}} - f_{B_t}) = f_I."""
    sched = TokenSchedule.cart((1, 2, 4), 3, 1)
    q = ScheduleQuantizer(sched, 8, 3)
    f = [torch.randn(2, 3, 4, 4, dtype=torch.float64) for _ in range(4)]
    targets = q.targets(f[0], f[1:])
    assert set(targets) == {0, 1, 2, 3}
    torch.testing.assert_close(targets[0], f[3])
    torch.testing.assert_close(sum(targets.values()), f[0], atol=1e-12, rtol=0)


def alg2_reference(q: ScheduleQuantizer, tokens, full):
    """Algorithm 2 written out independently: f_hat = sum_k phi_k(interpolate(lookup(r_k)))."""
    f_hat = 0
    for k, r in enumerate(tokens):
        z = q.codebook.weight[r].permute(0, 3, 1, 2)
        if z.shape[-1] != full:
            z = F.interpolate(z, size=(full, full), mode="bicubic")
        f_hat = f_hat + q.phis[k](z)
    return f_hat


def test_f_hat_is_the_sum_of_phi_terms_and_tokens_follow_the_schedule():
    torch.manual_seed(0)
    sched = TokenSchedule.cart((1, 2, 4, 8), 2, 2)
    q = ScheduleQuantizer(sched, 32, 6).eval()
    f = [torch.randn(3, 6, 8, 8) for _ in range(3)]
    out = q(f[0], f[1:])
    assert [tuple(t.shape) for t in out.tokens] == [(3, s.h, s.w) for s in sched]
    ref = alg2_reference(q, out.tokens, 8)
    torch.testing.assert_close(out.f_hat, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q.features(out.tokens), ref, atol=1e-5, rtol=1e-5)
    partial = alg2_reference(q, out.tokens[:4], 8)  # base steps only
    torch.testing.assert_close(q.features(out.tokens, upto=4), partial, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.f_hat_base, partial, atol=1e-5, rtol=1e-5)


def test_teacher_inputs_are_accumulated_f_hat_resampled_to_the_next_step():
    torch.manual_seed(0)
    sched = TokenSchedule.cart((1, 2, 4), 1, 2)
    q = ScheduleQuantizer(sched, 16, 5).eval()
    f = [torch.randn(2, 5, 4, 4) for _ in range(2)]
    tokens = q(f[0], f[1:]).tokens
    inputs = q.teacher_inputs(tokens)
    assert inputs.shape == (2, sched.seq_len - 1, 5)
    for m in range(1, sched.n_steps):
        acc = q.features(tokens, upto=m)
        s = sched[m]
        want = F.interpolate(acc, size=(s.h, s.w), mode="area") if s.h < 4 else acc
        got = inputs[:, sched.offsets[m] - 1 : sched.offsets[m + 1] - 1]
        torch.testing.assert_close(got, want.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)


def small_tokenizer(quantizer: str, order: int) -> Tokenizer:
    cfg = TokenizerConfig(
        quantizer=quantizer,
        channels=8,
        ch_mult=(1, 2),
        latent_channels=4,
        codebook_size=32,
        base_patch_nums=(1, 2, 4, 8),
    )
    return Tokenizer(cfg, DecomposeConfig(order=order), resolution=16)


def test_order_0_base_detail_is_multiscale():
    torch.manual_seed(0)
    ms = small_tokenizer("multiscale", 3)
    bd0 = small_tokenizer("base_detail", 0)
    assert bd0.schedule == ms.schedule
    bd0.load_state_dict(ms.state_dict())
    x = torch.rand(4, 3, 16, 16)
    for a, b in zip(ms.encode(x), bd0.encode(x)):
        assert torch.equal(a, b)


def test_base_tokens_equal_multiscale_tokens_when_bases_equal_the_image():
    """With B_k = I every f_{D_k} is 0: base-detail's base steps are exactly VAR's steps."""
    torch.manual_seed(0)
    ms = small_tokenizer("multiscale", 0)
    bd = small_tokenizer("base_detail", 2)
    state = {k: v for k, v in ms.state_dict().items() if "phis" not in k}
    bd.load_state_dict(state, strict=False)
    for k in range(4):  # same phi for the base steps
        bd.quantizer.phis[k].load_state_dict(ms.quantizer.phis[k].state_dict())
    x = torch.rand(3, 3, 16, 16)
    bases = torch.stack([x, x], 1)
    for a, b in zip(ms.encode(x), bd.encode(x, bases)[:4]):
        assert torch.equal(a, b)


def test_residual_error_never_increases_with_a_fitted_codebook():
    """Detail steps quantize a residual at full size: with the codebook fitted to the residuals
    (k-means, zero vector included) each added step can only lower the chain's error."""
    torch.manual_seed(0)
    sched = TokenSchedule.cart((8,), n_factors=1, depth_per_factor=5)
    q = identity_phi(ScheduleQuantizer(sched, 64, 4))
    f_i, f_b1 = torch.randn(16, 4, 8, 8), torch.randn(16, 4, 8, 8) * 0.3
    vecs = (f_i - f_b1).permute(0, 2, 3, 1).reshape(-1, 4)
    cb = vecs[torch.randperm(len(vecs))[:63]]
    for _ in range(10):  # Lloyd iterations
        assign = torch.cdist(vecs, cb).argmin(1)
        for j in range(len(cb)):
            if (assign == j).any():
                cb[j] = vecs[assign == j].mean(0)
    q.codebook.weight.data = torch.cat([cb, torch.zeros(1, 4)])
    mse = q(f_i, [f_b1]).step_mse[1:]  # the five steps of D_1
    assert (mse[1:] <= mse[:-1] + 1e-7).all(), mse
    assert mse[-1] < 0.5 * mse[0]


def test_base_detail_needs_bases_and_says_how():
    q = ScheduleQuantizer(TokenSchedule.cart((1, 2), 2, 1), 8, 3)
    with pytest.raises(ValueError, match="base_detail"):
        q(torch.randn(1, 3, 2, 2), None)


def test_tokenizer_refuses_mismatched_resolution_and_scales():
    cfg = TokenizerConfig(channels=8, ch_mult=(1, 2), latent_channels=4, base_patch_nums=(1, 2, 4))
    with pytest.raises(ValueError, match="base_patch_nums"):
        Tokenizer(cfg, DecomposeConfig(order=1), resolution=16)
    with pytest.raises(ValueError, match="divisible"):
        Tokenizer(cfg, DecomposeConfig(order=1), resolution=9)
    with pytest.raises(ValueError, match="quantizer"):
        Tokenizer(TokenizerConfig(quantizer="vq"), DecomposeConfig(), resolution=32)


def test_partial_reconstructions_and_dead_code_restart():
    torch.manual_seed(0)
    tok = small_tokenizer("base_detail", 1)
    x = torch.rand(2, 3, 16, 16)
    tok.train()
    tok(x, torch.stack([x * 0.5], 1))
    used = int((tok.quantizer.usage > 0).sum())
    restarted = tok.quantizer.restart_dead_codes()
    assert restarted == 32 - used and (tok.quantizer.usage == 0).all()
    tokens = tok.encode(x, torch.stack([x * 0.5], 1))
    steps = tok.partial_reconstructions(tokens)
    assert steps.shape == (tok.schedule.n_steps, 2, 3, 16, 16)
    assert steps.min() >= 0 and steps.max() <= 1


def test_detail_carry_lets_detail_steps_correct_the_base_error():
    """Alg. 1 as printed keeps the base's quantization error e; with carry the detail chain
    quantizes f_D + e and (given the code for it) removes it."""
    sched = TokenSchedule.cart((2,), n_factors=1, depth_per_factor=1)
    c_a, c_b, e = torch.tensor([3.0, 0, 0]), torch.tensor([0, 2.0, 0]), torch.tensor([0, 0, 0.3])
    f_b1 = (c_a + e).view(1, 3, 1, 1).expand(1, 3, 2, 2).contiguous()
    f_d1 = c_b.view(1, 3, 1, 1).expand(1, 3, 2, 2)
    f_i = f_b1 + f_d1
    errors = {}
    for carry in (False, True):
        q = identity_phi(ScheduleQuantizer(sched, 3, 3, carry=carry))
        q.codebook.weight.data = torch.stack([c_a, c_b, c_b + e])
        out = q(f_i, [f_b1])
        errors[carry] = (out.f_hat - f_i).abs().max().item()
    assert errors[False] == pytest.approx(0.3)
    assert errors[True] < 1e-6
