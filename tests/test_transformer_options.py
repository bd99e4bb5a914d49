"""VAR's transformer details as options: L2-normalised attention, stochastic depth, VAR's init,
shared adaLN; each changes what it should, and the KV-cached sampler still equals the full
forward with each of them on."""

import math

import pytest
import torch

from cartlib.config import DecomposeConfig, TokenizerConfig, load_preset
from cartlib.model import NextDetailTransformer, build_model
from cartlib.model.attention import record_attention
from cartlib.tokenizer import Tokenizer

V, C, CLASSES = 24, 4, 5


@pytest.fixture(scope="module")
def tok():
    cfg = TokenizerConfig(
        channels=8, ch_mult=(1, 2), latent_channels=C, codebook_size=V, base_patch_nums=(1, 2, 4)
    )
    torch.manual_seed(1)
    return Tokenizer(cfg, DecomposeConfig(order=2), resolution=8).eval()


def make(tok, seed=2, jitter=0.02, **options):
    torch.manual_seed(seed)
    m = NextDetailTransformer(tok.schedule, V, C, CLASSES, depth=3, width=32, heads=4, **options)
    for p in m.parameters():  # away from the zero/identity start so every path is exercised
        p.data.add_(jitter * torch.randn_like(p))
    return m.eval()


def tokens_of(schedule, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(V, (b, s.h, s.w), generator=g) for s in schedule]


def forward(model, tok, labels, tokens):
    return model(labels, tok.quantizer.teacher_inputs(tokens))


def test_l2_attention_logits_are_cosines_times_the_capped_head_scale(tok):
    model = make(tok, attn_l2_norm=True)
    attn = model.blocks[1].attn
    attn.scale_mul.data = torch.tensor([0.0, 1.0, 3.0, 10.0]).view(1, 4, 1, 1)  # exp 10 > 100
    labels, tokens = torch.tensor([0, 3]), tokens_of(tok.schedule, 2)
    with record_attention(model, layers=[1]) as maps:
        forward(model, tok, labels, tokens)
    a = maps[1][0]  # (B, heads, L, L)
    allowed = tok.schedule.attn_mask()
    logp = a.clamp_min(1e-30).log().masked_fill(~allowed, float("nan"))
    spread = (logp.nan_to_num(-1e9).amax(-1) - logp.nan_to_num(1e9).amin(-1)).amax((0, 2))  # (H,)
    bound = 2 * torch.tensor([1.0, math.e, math.e**3, 100.0])  # logits in [-s, s], s <= 100
    assert (spread <= bound + 1e-3).all(), (spread, bound)
    assert spread[0] < 2 < spread[3]  # the scale is what limits the logits
    # queries and keys are normalised: scaling their projection changes nothing
    before = a.clone()
    attn.qkv.weight.data[: 2 * 32] *= 7.0
    attn.qkv.bias.data[:32] *= 7.0  # (the key bias is held at 0)
    with record_attention(model, layers=[1]) as maps:
        forward(model, tok, labels, tokens)
    torch.testing.assert_close(maps[1][0], before, atol=1e-5, rtol=1e-4)


def test_plain_attention_depends_on_the_query_key_scale(tok):
    model = make(tok)
    labels, tokens = torch.tensor([0, 3]), tokens_of(tok.schedule, 2)
    with record_attention(model, layers=[1]) as maps:
        forward(model, tok, labels, tokens)
    before = maps[1][0].clone()
    model.blocks[1].attn.qkv.weight.data[:32] *= 7.0
    with record_attention(model, layers=[1]) as maps:
        forward(model, tok, labels, tokens)
    assert (maps[1][0] - before).abs().max() > 1e-2  # (so the test above can fail)


def test_drop_path_is_identity_in_eval_and_stochastic_per_sample_in_training(tok):
    model = make(tok, drop_path=0.5)
    rates = [blk.drop_path.p for blk in model.blocks]
    assert rates == pytest.approx([0.0, 0.25, 0.5])  # linear from 0 to the last block (VAR)
    plain = make(tok)  # same seed: same weights, no stochastic depth
    labels, tokens = torch.tensor([0, 1, 2, 3]), tokens_of(tok.schedule, 4)
    torch.testing.assert_close(
        forward(model, tok, labels, tokens), forward(plain, tok, labels, tokens)
    )
    model.train()
    torch.manual_seed(0)
    a = forward(model, tok, labels, tokens)
    b = forward(model, tok, labels, tokens)
    assert (a - b).abs().max() > 1e-3  # a fresh draw each forward
    drop = model.blocks[2].drop_path
    x = torch.ones(4000, 3)
    y = drop(x)
    kept = y[:, 0] != 0
    assert 0.45 < kept.float().mean() < 0.55  # whole samples dropped with p = 0.5
    assert torch.equal(y[kept], torch.full_like(y[kept], 2.0))  # survivors scaled by 1/(1-p)
    assert (y[~kept] == 0).all()
    model.eval()


def test_activation_checkpointing_recomputes_with_the_forwards_drop_path_masks(tok):
    """Backward through checkpointed blocks must see the masks the forward drew (accelerate's
    FSDP activation checkpointing did not preserve the RNG state: other masks, wrong gradients,
    silently). Same seed, with and without checkpointing: the same gradients."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from cartlib.train.parallel import checkpoint_blocks

    labels, tokens = torch.tensor([0, 1, 2, 3]), tokens_of(tok.schedule, 4)

    def grads(model):
        model.train()
        torch.manual_seed(5)
        forward(model, tok, labels, tokens).square().mean().backward()
        return {n: p.grad for n, p in model.named_parameters()}

    plain = grads(make(tok, drop_path=0.5))
    wrapped = make(tok, drop_path=0.5)
    checkpoint_blocks(wrapped)
    assert all(isinstance(b, type(checkpoint_wrapper(torch.nn.Identity()))) for b in wrapped.blocks)
    ckpt = grads(wrapped)
    names = {n.replace("_checkpoint_wrapped_module.", ""): g for n, g in ckpt.items()}
    assert names.keys() == plain.keys()
    for n, g in plain.items():
        torch.testing.assert_close(names[n], g, msg=n)


def test_var_init_scales_gates_shift_scale_head_and_residual_projections(tok):
    torch.manual_seed(0)
    depth, width = 6, 96
    var = NextDetailTransformer(
        tok.schedule, V, C, CLASSES, depth, width, 4, init_adaln=0.5, init_adaln_gamma=1e-3,
        init_head=0.02, init_residual_scale=True,
    )  # fmt: skip
    torch.manual_seed(0)
    zero = NextDetailTransformer(tok.schedule, V, C, CLASSES, depth, width, 4)
    std = math.sqrt(1 / (3 * width))
    w = var.blocks[0].ada[-1].weight.view(6, width, width)  # shift, scale, gate (attn, MLP)
    for i, mult in enumerate([0.5, 0.5, 1e-3, 0.5, 0.5, 1e-3]):
        assert w[i].std().item() == pytest.approx(std * mult, rel=0.05)  # trunc. normal
    assert var.head.weight.std().item() == pytest.approx(std * 0.02, rel=0.05)
    proj = var.blocks[3].attn.proj.weight.std().item()
    assert proj == pytest.approx(std / math.sqrt(2 * depth), rel=0.05)
    fc2 = var.blocks[3].mlp[2].weight.std().item()
    assert fc2 == pytest.approx(std / math.sqrt(2 * depth), rel=0.05)
    # the defaults are adaLN-Zero: gates and modulation start at 0, head x 0.1
    assert (zero.blocks[0].ada[-1].weight == 0).all() and (zero.head_ada[-1].weight == 0).all()
    assert zero.head.weight.std().item() == pytest.approx(std * 0.1, rel=0.05)
    assert zero.blocks[3].attn.proj.weight.std().item() == pytest.approx(std, rel=0.05)


def test_shared_adaln_has_one_projection_and_a_per_block_offset(tok):
    plain = make(tok)
    shared = make(tok, shared_adaln=True)
    w, depth = 32, 3
    per_block = w * 6 * w + 6 * w  # each block's own SiLU + Linear(W, 6W)
    assert plain.num_params() - shared.num_params() == depth * per_block - (
        per_block + depth * 6 * w
    )
    assert not hasattr(shared.blocks[0], "ada") and shared.blocks[0].ada_gss.shape == (1, 6 * w)
    labels, tokens = torch.tensor([0, 4]), tokens_of(tok.schedule, 2)
    base = forward(shared, tok, labels, tokens)
    shared.shared_ada[-1].weight.data.mul_(2)  # one projection modulates every block
    assert (forward(shared, tok, labels, tokens) - base).abs().max() > 1e-4


def test_build_model_reads_the_options_and_var_rule_for_drop_path():
    cfg = load_preset("cart-d16-256")
    a = cfg.ar
    assert (
        a.attn_l2_norm and a.drop_path is None and a.drop_path_rate == pytest.approx(0.1 * 16 / 24)
    )
    model = build_model(cfg, cfg.schedule(), 1000, device="meta")
    assert model.blocks[-1].drop_path.p == pytest.approx(0.1 * 16 / 24)
    assert model.blocks[0].attn.l2_norm and model.blocks[0].attn.scale_mul.shape == (1, 16, 1, 1)
    d36 = load_preset("var-d36-s-512")
    m36 = build_model(d36, d36.schedule(), 1000, device="meta")
    assert m36.shared_ada is not None
    assert abs(m36.num_params() - 2.3e9) / 2.3e9 < 0.03  # VAR's README: VAR-d36 2.3B


OPTIONS = {
    "l2_norm": {"attn_l2_norm": True},
    "drop_path": {"drop_path": 0.3},
    "var_init": {"init_adaln": 0.5, "init_adaln_gamma": 1e-3, "init_head": 0.02,
                 "init_residual_scale": True},
    "shared_adaln": {"shared_adaln": True},
}  # fmt: skip


@pytest.mark.parametrize("name", OPTIONS)
def test_kv_cached_steps_equal_the_full_forward_with_each_option(tok, name):
    model = make(tok, **OPTIONS[name])
    sched, q = tok.schedule, tok.quantizer
    labels = torch.tensor([4, 1, 0])
    tokens = tokens_of(sched, 3, seed=5)
    full = forward(model, tok, labels, tokens)
    cond = model.class_emb(labels)
    caches = model.new_caches()
    x = model.step_tokens(0, cond, None)
    for m in range(sched.n_steps):
        cached = model.forward_step(x, cond, caches)
        torch.testing.assert_close(cached, full[:, sched.step_slice(m)], atol=1e-5, rtol=1e-5)
        if m + 1 < sched.n_steps:
            x = model.step_tokens(m + 1, cond, q.next_input(q.features(tokens, m + 1), m + 1))
