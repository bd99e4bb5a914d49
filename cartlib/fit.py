"""Fitting a transformer training run into GPU memory: the estimate, and the choice it drives.

A run keeps its *global* batch (the paper's 768 at 256², 384 at 512²) whatever the GPU count; what
changes per machine is how one optimizer step is laid out on each GPU:

* ``micro_batch`` images go through forward and backward at once, ``accumulation`` micro-batches
  make one optimizer step (global batch = micro_batch x accumulation x world size);
* ``fsdp``: parameters, gradients and AdamW moments fully sharded over the GPUs (FSDP2 through
  accelerate, one unit per transformer block), else replicated (DDP);
* ``checkpointing``: activations of a block are recomputed in backward instead of kept.

:func:`training_memory` estimates the peak per GPU; :func:`choose_fit` picks the cheapest layout
that fits a stated memory (``gpu_mem_gib``): no checkpointing and no sharding if they fit at a
micro-batch of at least :data:`MIN_MICRO_BATCH`, then sharding, then checkpointing, then both;
within a layout the largest micro-batch that fits and divides the per-GPU batch.

The activation model is Korthikanti et al. 2022 ("Reducing activation recomputation", Table 2) for
a pre-norm block with fused (flash) attention: ~34 bytes per token and width unit per layer in
16-bit, plus VAR's adaLN (6 extra width-sized modulated copies are folded into the 34) and the
logits (bf16 logits, fp32 log-softmax for the cross-entropy: 6 bytes per token and vocabulary
entry). It is validated against measured peaks on a CPU in tests/test_fit.py and on a GPU by
benchmarks/gpu_check.py.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
MIN_MICRO_BATCH = 8  # below this a GPU runs inefficiently: prefer sharding/checkpointing first
HEADROOM = 0.9  # plan to at most this share of the GPU (allocator fragmentation, CUDA context)
ACT_BYTES_PER_TOKEN_WIDTH = 34  # per layer, 16-bit activations (Korthikanti et al. 2022)
STATE_BYTES_PER_PARAM = 16  # fp32 weights + fp32 gradients + AdamW's two fp32 moments


@dataclass(frozen=True)
class Fit:
    micro_batch: int
    accumulation: int
    fsdp: bool
    checkpointing: bool
    peak_gib: float  # estimated peak per GPU

    def describe(self) -> str:
        shard = "FSDP full sharding" if self.fsdp else "replicated (DDP)"
        ckpt = "activation checkpointing per block" if self.checkpointing else "no checkpointing"
        return (
            f"micro-batch {self.micro_batch} x {self.accumulation} accumulation step(s), "
            f"{shard}, {ckpt}: ~{self.peak_gib:.1f} GiB per GPU"
        )


def training_memory(
    n_params: int,
    depth: int,
    width: int,
    seq_len: int,
    vocab: int,
    micro_batch: int,
    world: int = 1,
    fsdp: bool = False,
    checkpointing: bool = False,
    act_bytes: int = 2,
) -> dict[str, float]:
    """Estimated peak bytes per GPU of one training step, by part (and ``"total"``).

    ``act_bytes``: 2 for bf16/fp16 activations, 4 for fp32 (CPU tests without autocast)."""
    state = STATE_BYTES_PER_PARAM * n_params / (world if fsdp else 1)
    per_layer = ACT_BYTES_PER_TOKEN_WIDTH / 2 * act_bytes * micro_batch * seq_len * width
    if checkpointing:  # block inputs kept for every layer, one layer's activations live
        acts = depth * act_bytes * micro_batch * seq_len * width + per_layer
    else:
        acts = depth * per_layer
    logits = (act_bytes + 4) * micro_batch * seq_len * vocab
    gathered = 2 * 2 * n_params / depth if fsdp else 0.0  # two blocks unsharded in bf16 at once
    parts = {"state": state, "activations": acts, "logits": logits, "gathered": gathered}
    parts["total"] = sum(parts.values())
    return parts


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def choose_fit(
    n_params: int,
    depth: int,
    width: int,
    seq_len: int,
    vocab: int,
    global_batch: int,
    world: int,
    gpu_mem_gib: float,
) -> Fit:
    """The cheapest layout of ``global_batch`` over ``world`` GPUs of ``gpu_mem_gib`` each."""
    if global_batch % world:
        counts = ", ".join(map(str, _divisors_desc(global_batch)[-8:]))
        raise ValueError(
            f"the global batch {global_batch} does not split evenly over {world} GPUs: choose a "
            f"GPU count that divides it (e.g. {counts}) or a batch_size divisible by it"
        )
    local = global_batch // world
    budget = HEADROOM * gpu_mem_gib * GIB
    best: Fit | None = None
    for fsdp, ckpt in ((False, False), (True, False), (False, True), (True, True)):
        if fsdp and world == 1:
            continue  # nothing to shard over
        for b in _divisors_desc(local):
            peak = training_memory(n_params, depth, width, seq_len, vocab, b, world, fsdp, ckpt)
            if peak["total"] <= budget:
                fit = Fit(b, local // b, fsdp, ckpt, peak["total"] / GIB)
                if b >= min(MIN_MICRO_BATCH, local):
                    return fit
                best = best or fit
                break
    if best is not None:
        return best
    one = training_memory(n_params, depth, width, seq_len, vocab, 1, world, world > 1, True)
    raise ValueError(
        f"even micro-batch 1 with sharding and checkpointing needs ~{one['total'] / GIB:.0f} GiB "
        f"per GPU (parameter state {one['state'] / GIB:.0f} GiB over {world} GPU(s)), more than "
        f"{HEADROOM:.0%} of {gpu_mem_gib} GiB: use more GPUs or larger ones"
    )
