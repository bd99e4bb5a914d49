"""The next-detail transformer: causality, KV cache = full forward, presets, sampling."""

import pytest
import torch

from cartlib.config import DecomposeConfig, TokenizerConfig
from cartlib.model import VAR_PARAMS, NextDetailTransformer, preset_param_count
from cartlib.sample import filter_logits, generate
from cartlib.tokenizer import Tokenizer

torch.manual_seed(0)


@pytest.fixture(scope="module")
def tok():
    cfg = TokenizerConfig(
        channels=8,
        ch_mult=(1, 2),
        latent_channels=4,
        codebook_size=24,
        base_patch_nums=(1, 2, 4),
        depth_per_factor=1,
    )
    torch.manual_seed(1)
    return Tokenizer(cfg, DecomposeConfig(order=2), resolution=8).eval()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(2)
    m = NextDetailTransformer(tok.schedule, 24, 4, num_classes=5, depth=2, width=32, heads=4)
    for p in m.parameters():  # leave adaLN-Zero's identity start so every path is exercised
        p.data.add_(0.02 * torch.randn_like(p))
    return m.eval()


def random_tokens(schedule, b, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(vocab, (b, s.h, s.w), generator=g) for s in schedule]


def full_logits(model, tok, labels, tokens):
    return model(labels, tok.quantizer.teacher_inputs(tokens))


def test_perturbing_step_m_changes_no_logits_of_steps_up_to_m(model, tok):
    sched = tok.schedule
    labels = torch.tensor([0, 3])
    tokens = random_tokens(sched, 2, 24)
    base = full_logits(model, tok, labels, tokens)
    for m in range(sched.n_steps - 1):
        changed = [t.clone() for t in tokens]
        changed[m] = (changed[m] + 1) % 24
        out = full_logits(model, tok, labels, changed)
        upto = sched.offsets[m + 1]
        torch.testing.assert_close(out[:, :upto], base[:, :upto], atol=0, rtol=0)
        assert (out[:, upto:] - base[:, upto:]).abs().max() > 1e-4  # later steps do see it


def test_gradient_of_early_logits_wrt_later_inputs_is_zero(model, tok):
    sched = tok.schedule
    inputs = tok.quantizer.teacher_inputs(random_tokens(sched, 1, 24)).detach().requires_grad_()
    logits = model(torch.tensor([1]), inputs)
    m = 2
    logits[:, : sched.offsets[m + 1]].sum().backward()
    later = inputs.grad[:, sched.offsets[m + 1] - 1 :]  # inputs of steps > m
    assert later.abs().max() == 0
    assert inputs.grad[:, : sched.offsets[m + 1] - 1].abs().max() > 0


def test_kv_cached_steps_equal_a_naive_full_forward_loop(model, tok):
    """Cached step-by-step logits == a naive loop that recomputes the whole sequence each step."""
    sched, q = tok.schedule, tok.quantizer
    labels = torch.tensor([4, 1, 0])
    tokens = random_tokens(sched, 3, 24, seed=5)
    cond = model.class_emb(labels)
    caches = model.new_caches()
    x = model.step_tokens(0, cond, None)
    for m in range(sched.n_steps):
        cached = model.forward_step(x, cond, caches)
        # naive reference: full forward with the known prefix, future steps filled with zeros
        prefix = [t if k <= m else torch.zeros_like(t) for k, t in enumerate(tokens)]
        naive = full_logits(model, tok, labels, prefix)[:, sched.step_slice(m)]
        torch.testing.assert_close(cached, naive, atol=1e-5, rtol=1e-5)
        if m + 1 < sched.n_steps:
            x = model.step_tokens(m + 1, cond, q.next_input(q.features(tokens, m + 1), m + 1))


def test_sampling_is_seeded_reproducible_and_greedy_matches_full_forward(model, tok):
    a = generate(model, tok, [0, 1, 2], cfg=1.5, top_k=10, top_p=0.9, seed=7)
    b = generate(model, tok, [0, 1, 2], cfg=1.5, top_k=10, top_p=0.9, seed=7)
    c = generate(model, tok, [0, 1, 2], cfg=1.5, top_k=10, top_p=0.9, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
    assert torch.equal(a.images, b.images)
    assert any(not torch.equal(x, y) for x, y in zip(a.tokens, c.tokens))
    greedy = generate(model, tok, [3, 4], cfg=0, temperature=0, return_steps=True)
    logits = full_logits(model, tok, torch.tensor([3, 4]), greedy.tokens)
    want = torch.cat([t.flatten(1) for t in greedy.tokens], 1)
    assert torch.equal(logits.argmax(-1), want)
    assert greedy.steps.shape == (tok.schedule.n_steps, 2, 3, 8, 8)


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    kept = ~torch.isinf(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 + 0.3 crosses 0.7
    assert (~torch.isinf(filter_logits(logits, top_p=1.0))).all()


def test_bad_sampling_arguments_are_named(model, tok):
    with pytest.raises(ValueError, match="labels"):
        generate(model, tok, [9])
    with pytest.raises(ValueError, match="top_p"):
        generate(model, tok, [0], top_p=0)
    with pytest.raises(ValueError, match="cfg_schedule"):
        generate(model, tok, [0], cfg=1.0, cfg_schedule="cosine")


@pytest.mark.parametrize("depth", [16, 20, 24, 30])
def test_preset_parameter_counts_match_var(depth):
    """Built on the meta device: no memory. VAR's counts are 310M/601M/1.03B/2.01B;
    our var-d* presets match them within 1%. CART adds only the position embeddings of its
    longer sequence (2066 vs 680 tokens) and 4 more level embeddings: +1.4M (d16) to +2.7M."""
    var = preset_param_count(f"var-d{depth}-256")
    cart = preset_param_count(f"cart-d{depth}-256")
    assert abs(var - VAR_PARAMS[depth]) / VAR_PARAMS[depth] < 0.01
    width = 64 * depth
    assert cart - var == (2066 - 680 + 14 - 10) * width


def test_attention_maps_sum_to_one_over_allowed_keys_and_are_zero_on_masked(model, tok):
    from cartlib.model.attention import record_attention, step_attention_profile

    sched = tok.schedule
    tokens = random_tokens(sched, 2, 24)
    plain = full_logits(model, tok, torch.tensor([0, 1]), tokens)
    with record_attention(model, layers=[0, 1]) as maps:
        recorded = full_logits(model, tok, torch.tensor([0, 1]), tokens)
    torch.testing.assert_close(recorded, plain, atol=1e-5, rtol=1e-5)  # same model, same output
    a = maps[1][0]  # (B, heads, L, L)
    assert a.shape == (2, 4, sched.seq_len, sched.seq_len)
    allowed = sched.attn_mask()
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 4, sched.seq_len))
    assert (a[..., ~allowed] == 0).all()
    assert not model.blocks[0].attn.store_attn  # switched off again
    with record_attention(model, layers=[1]) as maps:
        generate(model, tok, [0, 1], cfg=0, seed=0)
    per_step = maps[1]
    assert len(per_step) == sched.n_steps
    for m, s in enumerate(sched):
        assert per_step[m].shape == (2, 4, s.numel, sched.offsets[m + 1])
        torch.testing.assert_close(per_step[m].sum(-1), torch.ones(2, 4, s.numel))
    prof = step_attention_profile(per_step, sched)
    assert len(prof["distance"]) == sched.n_steps and prof["self_share"][0] == pytest.approx(1)
