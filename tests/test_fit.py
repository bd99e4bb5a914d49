"""The training-memory model and the layout it chooses (micro-batch, accumulation, FSDP,
activation checkpointing)."""

from __future__ import annotations

import pytest
import torch

from cartlib.config import load_preset
from cartlib.fit import (
    ACT_BYTES_PER_TOKEN_WIDTH,
    GIB,
    HEADROOM,
    block_bytes_per_token_width,
    choose_fit,
    choose_tokenizer_fit,
    tokenizer_activation_probe,
    training_memory,
)

D30 = {"n_params": 2_012_000_000, "depth": 30, "width": 1920, "seq_len": 2066, "vocab": 4096}


def _backward_start(parts: dict) -> float:
    return sum(v for k, v in parts.items() if k not in ("total", "optimizer_step"))


def test_memory_parts_scale_as_the_model_says():
    base = training_memory(**D30, micro_batch=8)
    assert base["total"] == pytest.approx(max(_backward_start(base), base["optimizer_step"]))
    double = training_memory(**D30, micro_batch=16)
    assert double["activations"] == pytest.approx(2 * base["activations"])
    for part in ("weights", "adamw", "weight_copies"):  # parameter terms: batch-free
        assert double[part] == base[part]
    sharded = training_memory(**D30, micro_batch=8, world=16, fsdp=True)
    assert sharded["adamw"] == pytest.approx(base["adamw"] / 16)
    assert sharded["weight_copies"] == 0  # FSDP gathers bf16 weights: autocast copies nothing
    ckpt = training_memory(**D30, micro_batch=8, checkpointing=True)
    assert ckpt["activations"] < base["activations"] / 5  # depth 30: keep inputs, one live layer
    # the optimizer step is the peak when activations are small: 16 B/param (+4 foreach)
    small = training_memory(**{**D30, "seq_len": 16}, micro_batch=1)
    assert small["total"] == small["optimizer_step"] == 16 * D30["n_params"]
    foreach = training_memory(**{**D30, "seq_len": 16}, micro_batch=1, fused=False)
    assert foreach["total"] == 20 * D30["n_params"]


@pytest.mark.parametrize(
    ("world", "mem", "batch"), [(16, 80, 768), (8, 141, 768), (16, 40, 768), (16, 80, 384)]
)
def test_chosen_layout_keeps_the_global_batch_and_fits(world, mem, batch):
    fit = choose_fit(**D30, global_batch=batch, world=world, gpu_mem_gib=mem)
    assert fit.micro_batch * fit.accumulation * world == batch
    assert fit.peak_gib <= HEADROOM * mem
    mb = training_memory(
        **D30,
        micro_batch=fit.micro_batch,
        world=world,
        fsdp=fit.fsdp,
        checkpointing=fit.checkpointing,
        accumulation=fit.accumulation,
    )
    assert mb["total"] / GIB == pytest.approx(fit.peak_gib)


def test_smaller_gpus_get_sharding_or_checkpointing_and_impossible_fits_say_so():
    big = choose_fit(**D30, global_batch=768, world=16, gpu_mem_gib=80)
    small = choose_fit(**D30, global_batch=768, world=16, gpu_mem_gib=40)
    # 2B params x 18 B (weights, moments, DDP's bucket, bf16 copies) = 34 GiB + 2066 tokens of
    # activations: sharded from 80 GB down
    assert big.fsdp and not big.checkpointing and big.micro_batch >= 8
    assert small.fsdp and small.peak_gib < big.peak_gib
    with pytest.raises(ValueError, match="does not split evenly over 7 GPUs"):
        choose_fit(**D30, global_batch=768, world=7, gpu_mem_gib=80)
    with pytest.raises(ValueError, match="use more GPUs or larger ones"):
        choose_fit(**D30, global_batch=768, world=1, gpu_mem_gib=16)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_memory_estimate_holds_against_a_measured_cpu_peak(checkpointing):
    """One fp32 training step of a depth-4 transformer on the CPU: the peak rise of the resident
    set during the step is within a factor 1.5 of the estimate (activations + logits)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    probe = Path(__file__).with_name("memory_probe.py")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, str(probe), str(int(checkpointing)), "32", "4", "256"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    m = json.loads(out.strip().splitlines()[-1])
    assert 1 / 1.5 < m["ratio"] < 1.5, m


@pytest.mark.parametrize("attention", ["sdpa", "per_step"])
@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_activation_constant_is_what_autograd_saves(precision, attention):
    """The constant the layouts are chosen with is a measurement, repeated here: the bytes
    autograd saves per token and width unit in one block (preset d30's options, fused
    attention) on a training attention path, the same at another width and schedule (it is per
    token and width)."""
    measured = block_bytes_per_token_width(128, precision=precision, attention=attention)
    other = block_bytes_per_token_width(64, (1, 2, 3, 4, 6, 8, 12), precision, attention=attention)
    print(
        f"{attention} {precision}: {measured:.2f} bytes per token x width (width 64: {other:.2f})"
    )
    assert measured == pytest.approx(ACT_BYTES_PER_TOKEN_WIDTH[attention][precision], rel=0.01)
    assert other == pytest.approx(measured, rel=0.05)
    assert measured > 34  # more than an all-16-bit block (Korthikanti et al.): fp32 residuals


def test_autocast_weight_copies_and_the_sdpa_mask_are_what_autograd_saves():
    """Whatever the batch, a block under bf16 autocast saves a bf16 copy of its weights for
    backward (2 B/param; fp32 saves the parameters themselves, nothing more), and on the sdpa
    path the additive L x L mask SDPA makes of the boolean one (2 B per pair under bf16)."""
    from cartlib.fit import (
        VAR_PATCHES,
        WEIGHT_COPY_BYTES,
        _block_saves,
        _probe_block,
        weight_copy_bytes_per_param,
    )
    from cartlib.schedule import TokenSchedule

    bf16, fp32 = weight_copy_bytes_per_param("bf16"), weight_copy_bytes_per_param("no")
    print(f"batch-free bytes saved per parameter: bf16 {bf16:.3f}, fp32 {fp32:.5f}")
    assert bf16 == pytest.approx(WEIGHT_COPY_BYTES["bf16"], rel=0.02)  # biases are not copied
    assert fp32 < 0.01 and WEIGHT_COPY_BYTES["no"] == 0
    schedule = TokenSchedule.var(VAR_PATCHES)
    block, length = _probe_block(128, "cart-d30-256", "cpu"), schedule.seq_len
    saved = _block_saves(block, schedule.attn_mask(), length, "bf16", "cpu")
    free = 2 * saved(1) - saved(2)  # batch-free part: weight copies and the additive mask
    copies = bf16 * sum(p.numel() for p in block.parameters())
    assert free - copies == pytest.approx(2 * length**2, rel=0.01)
    masks = training_memory(**D30, micro_batch=8, attention="sdpa")["masks"]
    assert masks == 30 * 2066**2 * 2


def test_adamw_state_is_two_fp32_moments_fused_or_not():
    """The optimizer term: build_optimizer's AdamW keeps 8 bytes per parameter (two fp32
    moments) after a step, fused or not (the step counters: one scalar per tensor)."""
    from cartlib.fit import ADAMW_BYTES
    from cartlib.train.loop import build_optimizer

    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64))
    n = sum(p.numel() for p in net.parameters())
    for fused in (False, True):
        opt = build_optimizer(net, 1e-3, 0.05, fused=fused)
        net(torch.randn(4, 64)).square().mean().backward()
        opt.step()
        state = [t for s in opt.state.values() for k, t in s.items() if k != "step"]
        assert sum(t.nbytes for t in state) == ADAMW_BYTES * n
        assert {t.dtype for t in state} == {torch.float32}
        assert opt.param_groups[0]["fused"] is (True if fused else None)


def test_gradient_terms_follow_the_training_layout():
    """Gradients live when a micro-batch's backward starts: DDP's bucket (the gradients are its
    views: nothing apart, unless accelerate's default is kept); under FSDP the sharded ones and,
    while no-sync micro-batches accumulate, the unsharded ones in the fp32 reduce dtype; in
    one process, those of earlier micro-batches."""
    n = D30["n_params"]
    one = training_memory(**D30, micro_batch=8)
    assert one["grads"] == 0 and one["weight_copies"] == 2 * n  # bf16 autocast copies
    assert training_memory(**D30, micro_batch=8, accumulation=2)["grads"] == 4 * n
    assert training_memory(**D30, micro_batch=8, precision="no")["weight_copies"] == 0
    ddp = training_memory(**D30, micro_batch=8, world=16, accumulation=6)
    assert ddp["grads"] == 4 * n  # bucket view: the bucket is the gradients
    apart = training_memory(**D30, micro_batch=8, world=16, accumulation=6, bucket_view=False)
    assert apart["grads"] == 8 * n and apart["optimizer_step"] == 20 * n
    fsdp = training_memory(**D30, micro_batch=8, world=16, fsdp=True)
    accumulating = training_memory(**D30, micro_batch=8, world=16, fsdp=True, accumulation=6)
    assert fsdp["grads"] == pytest.approx(4 * n / 16)
    assert accumulating["grads"] - fsdp["grads"] == 4 * n  # fp32, whatever the compute dtype


def _probe_json(args: list[str], monkeypatch, procs: int = 0) -> dict:
    """The last line of tests/memory_probe.py's output (``procs`` > 0: accelerate launch)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from launching import accelerate_launch, free_port

    probe = str(Path(__file__).with_name("memory_probe.py"))
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # freed memory leaves the RSS
    if procs:
        out = accelerate_launch([probe, *args], procs).stdout
    else:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, probe, *args, str(free_port())]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_ddp_bucket_view_keeps_one_copy_of_the_gradients(monkeypatch):
    """2 gloo processes through make_accelerator's DDP: wrapping and a first step keep AdamW's
    moments (8 B/param) and DDP's bucket (4 B/param) with or without the bucket view; a
    backward then adds nothing with it (the gradients are views of the bucket) and a separate
    4 B/param without it (accelerate's default)."""
    m = _probe_json(["ddp"], monkeypatch, procs=2)
    view, apart = m["view"], m["apart"]
    print(f"DDP bytes/param: bucket view {view}, accelerate's default {apart}")
    assert m["processes"] == 2
    for m in (view, apart):
        assert 12 <= m["kept_per_param"] < 13.5  # moments 8 + bucket 4 (+ allocator slack)
    assert view["backward_per_param"] < 0.3 and view["grad_storages"] < view["params"]
    assert 3.7 < apart["backward_per_param"] < 4.5 and apart["grad_storages"] == apart["params"]


def test_fsdp_accumulation_keeps_unsharded_gradients_in_fp32(monkeypatch):
    """FSDP2 with training's bf16 policy (one gloo process): a backward without gradient sync
    keeps the unsharded gradients upcast to the fp32 reduce dtype, 4 B/param (not the bf16
    compute dtype's 2); a second one accumulates into them."""
    m = _probe_json(["fsdp-accumulation"], monkeypatch)
    print(f"FSDP no-sync accumulation: {m}")
    assert m["dtypes"] == ["torch.float32"] and m["held_per_param"] == 4
    assert 3.7 < m["kept_per_param"] < 4.5 and m["second_backward_per_param"] < 0.3


# ------------------------------------------------------------------------------------ tokenizer
def _small_var_tokenizer():
    """The full-scale presets' tokenizer (VAR's architecture, order 3, LPIPS, discriminator) at
    64 channels, so that a CPU measures it in a second."""
    return load_preset("cart-d16-256").updated(tokenizer={"channels": 64})


@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_tokenizer_activations_are_per_pixel(precision):
    """The tokenizer's activation figure is measured at a 2x2 latent and used at 16x16 or 32x32:
    it must not depend on the resolution it is measured at (here 2x2 against 4x4 latents)."""
    # 32 channels (the others probe 64): bf16 is emulated on AVX2-only CPUs, 15x slower than fp32
    cfg = _small_var_tokenizer().updated(tokenizer={"seed": 7, "channels": 32})
    rng = torch.random.get_rng_state()
    small = tokenizer_activation_probe(cfg, precision, latent=2)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the caller's stream is untouched
    large = tokenizer_activation_probe(cfg, precision, latent=4)
    print(f"{precision}: {small['bytes_per_pixel']:.0f} / {large['bytes_per_pixel']:.0f} B/px")
    assert large["bytes_per_pixel"] == pytest.approx(small["bytes_per_pixel"], rel=0.02)
    assert small["trained_params"] == large["trained_params"] > 0
    assert small["frozen_params"] > 0  # the perceptual network is counted


def test_tokenizer_memory_estimate_holds_against_a_measured_cpu_peak():
    """One fp32 tokenizer step (VAR's architecture at 64 channels, 64px, order 3, LPIPS and the
    discriminator) on the CPU: the peak rise of the resident set is within a factor 1.3 of the
    estimate, which was measured at 32px and scaled by the pixels."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    probe = Path(__file__).with_name("memory_probe.py")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, str(probe), "tokenizer", "2", "64", "64"],
        capture_output=True, text=True, env=env, check=True,
    ).stdout  # fmt: skip
    m = json.loads(out.strip().splitlines()[-1])
    assert 1 / 1.3 < m["ratio"] < 1.3, m


def test_tokenizer_layout_accumulates_what_does_not_fit():
    """At 512px the presets' 16 images per GPU do not fit 80 GB at once: the micro-batch shrinks
    and the rest is accumulated, the batch kept; a GPU too small for one image says so."""
    cfg = _small_var_tokenizer()
    probe = tokenizer_activation_probe(cfg, "bf16")
    small = choose_tokenizer_fit(probe, 256, 256, 16, 80)
    assert (small.micro_batch, small.accumulation) == (16, 1)
    budget = probe["bytes_per_pixel"] * 512**2 * 5 / GIB  # room for ~5 images at 512px
    big = choose_tokenizer_fit(probe, 512, 256, 16, budget / HEADROOM + 1)
    assert big.micro_batch * big.accumulation == 16 and big.micro_batch == 4
    assert big.peak_gib <= HEADROOM * (budget / HEADROOM + 1)
    with pytest.raises(ValueError, match="one 512px image per tokenizer step needs"):
        choose_tokenizer_fit(probe, 512, 256, 16, 1)
    with pytest.raises(ValueError, match="does not split evenly over 3 processes"):
        choose_tokenizer_fit(probe, 256, 256, 3, 80)


def test_full_scale_tokenizer_runs_are_planned_and_small_ones_are_not(capsys):
    """The tokenizer stage of a full-scale config gets the micro-batch that fits (said in its
    first lines); a micro-batch set by hand is kept; the smoke preset is left as it is."""
    from cartlib.launch import plan_tokenizer

    cfg = _small_var_tokenizer().updated(data={"resolution": 512}, gpu_mem_gib=20)
    cfg = cfg.updated(tokenizer={"base_patch_nums": [1, 2, 4, 8, 16, 32]})
    planned = plan_tokenizer(cfg, world=16)
    micro = planned.tokenizer.micro_batch
    assert micro is not None and micro < 16 and 16 % micro == 0
    said = capsys.readouterr().out
    assert f"micro-batch {micro} x {16 // micro} accumulation step(s) of 16 images" in said
    assert plan_tokenizer(cfg.updated(tokenizer={"micro_batch": 1}), 16).tokenizer.micro_batch == 1
    smoke = load_preset("smoke")
    assert plan_tokenizer(smoke, 1) is smoke


# ------------------------------------------------------------------------------------ GPU-hours
def test_counted_transformer_flops_match_the_formula():
    """The GPU-hour estimates rest on FlopCounterMode's count of one forward: for CART-d16 it
    equals the textbook count (24 W² per token and block for the projections and MLP, 4 S W for
    the dense attention, the head, the input projection, the per-image adaLN) within 1 %."""
    from cartlib.fit import ar_forward_flops, gpu_hours

    cfg = load_preset("cart-d16-256")
    s, a, t = cfg.schedule(), cfg.ar, cfg.tokenizer
    w, n, depth = a.model_width, s.seq_len, a.depth
    first = s[0].h * s[0].w
    formula = n * depth * (24 * w * w + 4 * n * w) + 2 * n * w * t.codebook_size
    formula += 2 * (n - first) * t.latent_channels * w + 2 * depth * w * 6 * w + 2 * w * 2 * w
    counted = ar_forward_flops(cfg)
    print(f"counted {counted / 1e12:.4f} TFLOP, formula {formula / 1e12:.4f}")
    assert counted == pytest.approx(formula, rel=0.01)
    d16, d30 = gpu_hours(cfg), gpu_hours(load_preset("cart-d30-256"))
    assert 0 < d16["ar"] < d30["ar"] and d16["tokenizer"] == pytest.approx(d30["tokenizer"])
    assert gpu_hours(cfg.updated(tokenizer={"init_from": "vae.pth"}))["tokenizer"] == 0
