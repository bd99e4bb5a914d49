"""The training-memory model and the layout it chooses (micro-batch, accumulation, FSDP,
activation checkpointing)."""

from __future__ import annotations

import pytest

from cartlib.fit import (
    ACT_BYTES_PER_TOKEN_WIDTH,
    GIB,
    HEADROOM,
    block_bytes_per_token_width,
    choose_fit,
    training_memory,
)

D30 = {"n_params": 2_012_000_000, "depth": 30, "width": 1920, "seq_len": 2066, "vocab": 4096}


def test_memory_parts_scale_as_the_model_says():
    base = training_memory(**D30, micro_batch=8)
    assert base["total"] == pytest.approx(sum(v for k, v in base.items() if k != "total"))
    double = training_memory(**D30, micro_batch=16)
    assert double["activations"] == pytest.approx(2 * base["activations"])
    assert double["state"] == base["state"]  # the optimizer state does not depend on the batch
    sharded = training_memory(**D30, micro_batch=8, world=16, fsdp=True)
    assert sharded["state"] == pytest.approx(base["state"] / 16)
    ckpt = training_memory(**D30, micro_batch=8, checkpointing=True)
    assert ckpt["activations"] < base["activations"] / 5  # depth 30: keep inputs, one live layer


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
    # 2B params x 16 B = 30 GiB of state + 7.5 GiB of DDP buckets: sharded from 80 GB down
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


@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_activation_constant_is_what_autograd_saves(precision):
    """The constant the layouts are chosen with is a measurement, repeated here: the bytes
    autograd saves per token and width unit in one block (preset d30's options, fused
    attention), the same at another width and sequence length (it is per token and width)."""
    measured = block_bytes_per_token_width(128, 512, precision)
    other = block_bytes_per_token_width(64, 256, precision)
    print(
        f"{precision}: {measured:.2f} bytes per token x width (width 64, 256 tokens: {other:.2f})"
    )
    assert measured == pytest.approx(ACT_BYTES_PER_TOKEN_WIDTH[precision], rel=0.01)
    assert other == pytest.approx(measured, rel=0.05)
    assert measured > 34  # more than an all-16-bit block (Korthikanti et al.): fp32 residuals


def test_gradient_buffers_are_counted():
    """DDP's flat gradient buckets on several GPUs; under FSDP the unsharded gradients that
    no-sync micro-batches accumulate."""
    one = training_memory(**D30, micro_batch=8)
    ddp = training_memory(**D30, micro_batch=8, world=16)
    assert one["grad_buffers"] == 0 and ddp["grad_buffers"] == 4 * D30["n_params"]
    fsdp = training_memory(**D30, micro_batch=8, world=16, fsdp=True)
    accumulating = training_memory(**D30, micro_batch=8, world=16, fsdp=True, accumulation=6)
    assert fsdp["grad_buffers"] == 0 and accumulating["grad_buffers"] == 2 * D30["n_params"]
