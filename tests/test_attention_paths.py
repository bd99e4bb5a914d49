"""The transformer's training attention paths and compiled blocks change speed, never results.

Against the reference (one SDPA call with the schedule's boolean mask), in fp32 on the CPU, with
dropout off: ``per_step`` gives the same logits and parameter gradients within 1e-5 for VAR's
680-token and CART's 2066-token 256-px schedules and the smoke schedule; ``flex`` the same logits
(torch 2.14 has no flex backward on the CPU, so with gradients it runs the reference). KV-cached
sampling and attention-map recording are the same whatever the path; ``torch.compile`` of the
blocks gives the eager loss and gradients. ``make test-avx2`` runs the same on AVX2 kernels.
"""

import warnings

import pytest
import torch

from cartlib.config import ConfigError, load_preset
from cartlib.model import build_model
from cartlib.model.attention import record_attention
from cartlib.model.transformer import (
    BlockCausal,
    NextDetailTransformer,
    SelfAttention,
    attention_path,
    compile_on,
)
from cartlib.schedule import TokenSchedule

V, C, CLASSES = 16, 4, 5
TOL = 1e-5  # fp32: logits (of order 1) in absolute terms, gradients relative to each tensor's
# largest entry (the summed loss below gives gradients of order 1e2-1e3)
SCHEDULES = {
    "var-256": TokenSchedule.var((1, 2, 3, 4, 5, 6, 8, 10, 13, 16)),  # 680 tokens
    "cart-256": TokenSchedule.cart((1, 2, 3, 4, 6, 8, 12, 16), 3, 2),  # 2066 tokens
    "smoke": TokenSchedule.cart((1, 2, 4, 8), 3, 1),  # 277 tokens
}


@pytest.fixture(autouse=True)
def _quiet_eager_flex():
    with warnings.catch_warnings():  # eager flex_attention warns that it is not compiled
        warnings.filterwarnings("ignore", message=".*flex_attention.*")
        yield


def make(schedule, seed=0, **options):
    torch.manual_seed(seed)
    m = NextDetailTransformer(schedule, V, C, CLASSES, depth=2, width=16, heads=2, **options)
    for p in m.parameters():  # away from adaLN-Zero's identity start: attention matters
        p.data.add_(0.05 * torch.randn_like(p))
    return m


def batch(schedule, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(CLASSES + 1, (b,), generator=g)
    inputs = torch.randn(b, schedule.seq_len - schedule[0].numel, C, generator=g)
    return labels, inputs


def logits_and_grads(model, labels, inputs, path):
    model.attention = path
    model.zero_grad()
    logits = model(labels, inputs)
    logits.square().sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def max_diff(a: dict, b: dict) -> float:
    """The largest difference of gradients ``a`` and ``b``, relative to the tensor's scale."""
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-30)).item() for n in a)


@pytest.mark.parametrize("l2_norm", [False, True], ids=["plain", "l2_norm"])
@pytest.mark.parametrize("name", SCHEDULES)
def test_per_step_equals_the_masked_reference_in_logits_and_gradients(name, l2_norm):
    sched = SCHEDULES[name]
    model = make(sched, attn_l2_norm=l2_norm).train()
    labels, inputs = batch(sched)
    ref, ref_grads = logits_and_grads(model, labels, inputs, "sdpa")
    out, grads = logits_and_grads(model, labels, inputs, "per_step")
    assert (out - ref).abs().max().item() <= TOL
    assert max_diff(grads, ref_grads) <= TOL
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "attn.qkv" in n)


@pytest.mark.parametrize("l2_norm", [False, True], ids=["plain", "l2_norm"])
@pytest.mark.parametrize("name", SCHEDULES)
def test_flex_equals_the_reference_forward_and_falls_back_with_gradients(name, l2_norm):
    sched = SCHEDULES[name]
    model = make(sched, attn_l2_norm=l2_norm).eval()
    labels, inputs = batch(sched)
    with torch.no_grad():
        ref = model(labels, inputs)
        model.attention = "flex"
        out = model(labels, inputs)  # flex_attention itself (eager on the CPU)
    assert (out - ref).abs().max().item() <= TOL
    plan = model.block_causal(torch.device("cpu"))
    assert plan.path == "flex" and plan.block_mask.shape[-2:] == (sched.seq_len, sched.seq_len)
    ref_out, ref_grads = logits_and_grads(model, labels, inputs, "sdpa")
    out, grads = logits_and_grads(model, labels, inputs, "flex")  # CPU backward: the reference
    assert torch.equal(out, ref_out) and max_diff(grads, ref_grads) == 0


def test_per_step_groups_cover_every_query_once_and_see_exactly_the_mask():
    for sched in SCHEDULES.values():
        plan = BlockCausal.build(sched, "per_step", "cpu")
        stops = [b for _, b, _ in plan.groups]
        assert [a for a, _, _ in plan.groups] == [0, *stops[:-1]] and stops[-1] == sched.seq_len
        assert set(stops) <= set(sched.offsets)  # a call ends where a step ends
        mask = sched.attn_mask()
        for a, b, rows in plan.groups:
            seen = torch.ones(b - a, b, dtype=torch.bool) if rows is None else rows
            assert torch.equal(seen, mask[a:b, :b]) and not mask[a:b, b:].any()
        assert sum(rows is None for *_, rows in plan.groups) >= len(plan.groups) - 1


@pytest.mark.parametrize("path", ["sdpa", "per_step"])
def test_attention_dropout_keeps_its_rate_in_every_path(path):
    """Dropout on the attention probabilities: the output's mean over many draws is the
    dropout-free output (kept probabilities scaled by 1 / (1 - p)), in each path."""
    sched = SCHEDULES["smoke"]
    torch.manual_seed(3)
    attn = SelfAttention(16, 2, dropout=0.5)
    x = torch.randn(1, sched.seq_len, 16)
    mask = sched.attn_mask() if path == "sdpa" else BlockCausal.build(sched, path, "cpu")
    with torch.no_grad():
        clean = attn.eval()(x, mask)
        attn.train()
        draws = torch.stack([attn(x, mask) for _ in range(200)])
    assert not torch.equal(draws[0], clean)
    spread = draws.std(0) / 200**0.5
    assert ((draws.mean(0) - clean).abs() <= 5 * spread + 1e-6).float().mean() > 0.99


def test_flex_with_attention_dropout_runs_the_reference():
    sched = SCHEDULES["smoke"]
    torch.manual_seed(3)
    attn = SelfAttention(16, 2, dropout=0.3).train()
    x = torch.randn(2, sched.seq_len, 16)
    with torch.no_grad():
        torch.manual_seed(4)
        ref = attn(x, sched.attn_mask())
        torch.manual_seed(4)
        out = attn(x, BlockCausal.build(sched, "flex", "cpu"))
    assert torch.equal(out, ref)  # the same random draws: the same call


@pytest.mark.parametrize("path", ["per_step", "flex"])
def test_recording_attention_maps_runs_the_reference_in_every_path(path):
    sched = SCHEDULES["smoke"]
    model = make(sched, attention=path).eval()
    labels, inputs = batch(sched)
    with torch.no_grad():
        plain = model(labels, inputs)
        with record_attention(model, layers=[1]) as maps:
            recorded = model(labels, inputs)
    assert (recorded - plain).abs().max().item() <= TOL
    a = maps[1][0]  # (B, heads, L, L)
    assert a.shape == (2, 2, sched.seq_len, sched.seq_len)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, sched.seq_len))
    assert (a[..., ~sched.attn_mask()] == 0).all()


@pytest.mark.parametrize("name", ["var-256", "smoke"])
def test_kv_cached_steps_equal_the_full_forward_of_each_path(name):
    """Sampling's cached steps (dense attention on the cache, the same in every path) give the
    teacher-forced logits of the per-step path and of the reference."""
    sched = SCHEDULES[name]
    model = make(sched).eval()
    labels, inputs = batch(sched)
    full = {}
    with torch.no_grad():
        for path in ("sdpa", "per_step"):
            model.attention = path
            full[path] = model(labels, inputs)
        cond = model.class_emb(labels)
        caches = model.new_caches()
        x = model.step_tokens(0, cond, None)
        for m in range(sched.n_steps):
            cached = model.forward_step(x, cond, caches)
            for path in full:
                assert (cached - full[path][:, sched.step_slice(m)]).abs().max() <= TOL, path
            if m + 1 < sched.n_steps:
                sl, first = sched.step_slice(m + 1), sched[0].numel  # inputs start at step 1
                x = model.step_tokens(m + 1, cond, inputs[:, sl.start - first : sl.stop - first])


def test_settings_choose_per_device_are_checked_and_leave_artifact_keys_alone():
    assert attention_path("auto", "cpu") == "per_step" == attention_path("auto", "cuda")
    assert attention_path("sdpa", "cuda") == "sdpa"
    assert compile_on("auto", "cuda") and not compile_on("auto", "cpu") and compile_on(True, "cpu")
    with pytest.raises(ValueError, match="attention='fast' is unknown"):
        attention_path("fast", "cpu")
    for bad, message in (({"attention": "flash"}, "ar.attention='flash'"),
                         ({"compile": "yes"}, "ar.compile='yes'")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            load_preset("smoke", ar=bad)
    cfg = load_preset("smoke")
    other = cfg.updated(ar={"attention": "sdpa", "compile": True})
    assert other.artifact_key("ar") == cfg.artifact_key("ar")
    model = build_model(other, cfg.schedule(), 10, device="meta")
    assert (model.attention, model.compile_blocks) == ("sdpa", True)


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_loss_and_gradients():
    """Regional torch.compile (inductor, C++ on the CPU: ~25-30 s on a quiet 2-core machine with
    a cold cache, under 10 s with inductor's cache): loss within 1e-6 (relative) and gradients
    within 1e-5 of eager; all blocks share one graph."""
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor

    sched = SCHEDULES["smoke"]
    model = make(sched).train()
    labels, inputs = batch(sched)
    target = torch.randint(V, (2, sched.seq_len), generator=torch.Generator().manual_seed(2))
    results = {}
    counters.clear()
    for mode in (False, True):
        model.compile_blocks = mode
        model.zero_grad()
        with inductor.patch(compile_threads=1):  # no pool of compile workers on 2 cores
            loss = torch.nn.functional.cross_entropy(model(labels, inputs).transpose(1, 2), target)
            loss.backward()
        results[mode] = loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}
    assert abs(results[True][0] - results[False][0]) <= 1e-6 * abs(results[False][0])
    assert max_diff(results[True][1], results[False][1]) <= TOL
    assert counters["stats"]["unique_graphs"] == 1  # one graph for both blocks
