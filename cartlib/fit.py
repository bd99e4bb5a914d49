"""Fitting a transformer training run into GPU memory: the estimate, and the choice it drives.

A run keeps its *global* batch (the paper's 768 at 256², 384 at 512²) whatever the GPU count; what
changes per machine is how one optimizer step is laid out on each GPU:

* ``micro_batch`` images go through forward and backward at once, ``accumulation`` micro-batches
  make one optimizer step (global batch = micro_batch x accumulation x world size);
* ``fsdp``: parameters, gradients and AdamW moments fully sharded over the GPUs (FSDP2, one unit
  per transformer block), else replicated (DDP with ``gradient_as_bucket_view``, as
  :func:`cartlib.train.loop.make_accelerator` sets it);
* ``checkpointing``: activations of a block are recomputed in backward instead of kept.

:func:`training_memory` estimates the peak per GPU; :func:`choose_fit` picks the cheapest layout
that fits a stated memory (``gpu_mem_gib``): no checkpointing and no sharding if they fit at a
micro-batch of at least :data:`MIN_MICRO_BATCH`, then sharding, then checkpointing, then both;
within a layout the largest micro-batch that fits and divides the per-GPU batch.

The peak is the larger of two moments; per GPU, with n parameters, L tokens per image, W the
width, V the vocabulary, parameter state divided by the world size under FSDP ("measured": by
tests/test_fit.py, on the CPU; docs/memory-model.md has the numbers):

* the start of backward:

  - ``weights``, fp32: 4 n (assumed: the definition); ``adamw``, two fp32 moments: 8 n
    (measured, fused or not);
  - ``grads``: DDP's bucket, 4 n, allocated when DDP wraps the model, the gradients its views
    (measured, 2 gloo processes); under FSDP 4 n / world, plus 4 n while micro-batches
    accumulate without sync: FSDP2 keeps them unsharded in the fp32 reduce dtype (measured;
    torch's ``FSDPParam.to_accumulated_grad_if_needed``); in one process 4 n when accumulating,
    none at the first backward (``zero_grad(set_to_none=True)``: assumed);
  - ``weight_copies``: the bf16 weights autograd saves under autocast, 2 n, none under FSDP
    (measured: the batch-free part of what a block saves);
  - ``activations`` (measured, below); ``logits``, :data:`LOGIT_BYTES` per token and vocabulary
    entry (assumed; checked with the activations against a CPU step's peak);
  - ``masks``: on the ``sdpa`` path the additive mask each block's SDPA keeps, depth x L² in the
    compute dtype (measured on the CPU, assumed on CUDA); ``gathered``, FSDP: two blocks in the
    compute dtype and one fp32 reduce-scatter input (assumed: FSDP2's prefetch and buffers).

* the optimizer step: weights, moments and gradients, 16 n, plus 4 n for DDP without the bucket
  view (gradients and bucket apart) and 4 n for foreach AdamW's temporary (the square roots of
  the second moments; fused AdamW, what training uses on CUDA, has none).

Not counted, inside :data:`HEADROOM`: the CUDA context and NCCL's buffers (outside
``torch.cuda.max_memory_allocated``) and allocator fragmentation. ``benchmarks/gpu_check.py``
compares the estimate with ``torch.cuda.max_memory_allocated`` (docs/gpu-table.md).

The activation term is measured, not assumed: :func:`block_bytes_per_token_width` counts the bytes
autograd saves for backward in one transformer block (``torch.autograd.graph.saved_tensors_hooks``,
each storage once, the difference between batch 2 and batch 1 so that weights and masks drop out)
with the presets' block options (L2-normalised attention, stochastic depth, adaLN) on each
training attention path, with fused attention as on GPUs; :data:`ACT_BYTES_PER_TOKEN_WIDTH` holds
the results under bf16 autocast and in fp32. Under bf16 autocast the residual stream, LayerNorm
outputs and normalised q/k stay fp32, which is why it is ~1.6x Korthikanti et al.'s 34 bytes for
an all-16-bit block; ``per_step`` keeps 2 (bf16) or 4 (fp32) bytes more than ``sdpa``: its
per-step outputs and their concatenation, laid out for the output projection, are two tensors.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from cartlib.config import load_preset
from cartlib.model import build_model
from cartlib.model.transformer import Block, BlockCausal
from cartlib.perceptual import lpips_model
from cartlib.schedule import TokenSchedule
from cartlib.tokenizer import Tokenizer
from cartlib.tokenizer.losses import CompoundLoss
from cartlib.tokenizer.vqvae import downsample_factor

GIB = 2**30
MIN_MICRO_BATCH = 8  # below this a GPU runs inefficiently: prefer sharding/checkpointing first
HEADROOM = 0.9  # plan to at most this share of the GPU (allocator fragmentation, CUDA context)
VAR_PATCHES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # VAR-256's schedule: the activations' probe
# bytes autograd saves per token and width unit in one block, by training attention path and
# precision: measured with block_bytes_per_token_width at width 128 on VAR_PATCHES (680 tokens;
# tests/test_fit.py repeats it). flex has no backward on the CPU: assumed equal to sdpa (it keeps
# q, k, v, the output and the log-sum-exp, as the fused SDPA kernels do).
ACT_BYTES_PER_TOKEN_WIDTH = {
    "sdpa": {"bf16": 54.3, "no": 92.5},
    "per_step": {"bf16": 56.3, "no": 96.5},
    "flex": {"bf16": 54.3, "no": 92.5},
}
TRAINING_ATTENTION = "per_step"  # the path ar.attention="auto" trains with (CPU and CUDA)
# the logits at the backward's peak, per token and vocabulary entry: the fp32 logits and the
# log-softmax the loss keeps (4 + 4), the gradient of each (4 + 4)
LOGIT_BYTES = 16
WEIGHT_BYTES, ADAMW_BYTES, GRAD_BYTES = 4, 8, 4  # per parameter: fp32 weights, moments, gradients
STATE_BYTES_PER_PARAM = WEIGHT_BYTES + ADAMW_BYTES + GRAD_BYTES  # 16
# bf16 weight copies autograd saves under autocast (measured: weight_copy_bytes_per_param)
WEIGHT_COPY_BYTES = {"bf16": 2, "no": 0}
ACCUMULATED_GRAD_BYTES = 4  # FSDP2 no-sync: unsharded gradients in the reduce dtype (fp32)
DDP_BUCKET_BYTES_PER_PARAM = 4  # DDP's fp32 gradient bucket (the gradients, with bucket view)
FOREACH_ADAMW_TEMP_BYTES = 4  # foreach AdamW's sqrt(second moment) list; fused: none


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


def _grad_bytes(n: float, world: int, fsdp: bool, accumulation: int, bucket_view: bool) -> float:
    """Gradient memory live when a micro-batch's backward starts (see the module doc)."""
    accumulating = accumulation > 1  # earlier micro-batches' gradients are there
    if fsdp:
        return GRAD_BYTES * n / world + (ACCUMULATED_GRAD_BYTES * n if accumulating else 0.0)
    if world > 1:  # the bucket is allocated when DDP wraps; without bucket view grads apart
        apart = GRAD_BYTES * n if accumulating and not bucket_view else 0.0
        return DDP_BUCKET_BYTES_PER_PARAM * n + apart
    return GRAD_BYTES * n if accumulating else 0.0


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
    precision: str = "bf16",
    accumulation: int = 1,
    attention: str = TRAINING_ATTENTION,
    bucket_view: bool = True,
    fused: bool = True,
) -> dict[str, float]:
    """Estimated peak bytes per GPU of one training step: the parts live when backward starts,
    ``"optimizer_step"`` (the total at the step) and ``"total"``, the larger of the two.

    ``precision``: ``bf16`` (autocast, the GPUs' setting; fp16 saves the same) or ``no`` (fp32,
    CPU tests). ``accumulation``: micro-batches per optimizer step. ``attention``: the training
    path (``sdpa`` | ``per_step`` | ``flex``). ``bucket_view``: DDP's gradients are views of its
    bucket (cartlib's setting; False: accelerate's default). ``fused``: fused AdamW (cartlib on
    CUDA) rather than foreach. The terms: module doc and docs/memory-model.md."""
    half = "no" if precision == "no" else "bf16"
    n, shard = float(n_params), world if fsdp else 1
    act = ACT_BYTES_PER_TOKEN_WIDTH[attention][half]
    per_layer = act * micro_batch * seq_len * width
    if checkpointing:  # block inputs (the fp32 residual stream) kept per layer, one layer live
        acts = depth * 4 * micro_batch * seq_len * width + per_layer
    else:
        acts = depth * per_layer
    compute = 4 if half == "no" else 2  # bytes of the compute dtype
    parts = {
        "weights": WEIGHT_BYTES * n / shard,
        "adamw": ADAMW_BYTES * n / shard,
        "grads": _grad_bytes(n, world, fsdp, accumulation, bucket_view),
        "weight_copies": 0.0 if fsdp else WEIGHT_COPY_BYTES[half] * n,
        "activations": acts,
        "logits": LOGIT_BYTES * micro_batch * seq_len * vocab,
        "masks": depth * seq_len**2 * compute if attention == "sdpa" else 0.0,
        "gathered": (2 * compute + 4) * n / depth if fsdp else 0.0,
    }
    step = STATE_BYTES_PER_PARAM * n / shard
    step += DDP_BUCKET_BYTES_PER_PARAM * n if world > 1 and not fsdp and not bucket_view else 0.0
    step += 0.0 if fused else FOREACH_ADAMW_TEMP_BYTES * n / shard
    parts["optimizer_step"] = step
    parts["total"] = max(step, sum(v for k, v in parts.items() if k != "optimizer_step"))
    return parts


def saved_bytes(fn, exclude: set[int] = frozenset()) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn()`` runs, each storage
    counted once and storages whose address is in ``exclude`` not at all."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _probe_block(width: int, preset: str, device: str) -> Block:
    """One transformer block of ``preset``'s options at ``width``, in training mode, with fused
    attention (SDPA) as on GPUs."""
    a = load_preset(preset).ar
    torch.manual_seed(0)
    heads = max(1, width // 64)
    block = Block(width, heads, a.mlp_ratio, a.dropout, a.attn_l2_norm, a.drop_path_rate or 0.1)
    block = block.to(device).train()
    block.attn.cpu_bf16_explicit = False
    return block


def _block_saves(block: Block, mask, tokens: int, precision: str, device: str):
    """-> saved(batch): the bytes ``block`` saves for backward on a batch of ``tokens`` tokens
    under ``precision`` (bf16 autocast or fp32), its parameters and ``mask`` not counted."""
    fixed = [*block.parameters(), *block.buffers()]
    if isinstance(mask, torch.Tensor):
        fixed.append(mask)
    exclude = {t.untyped_storage().data_ptr() for t in fixed}
    width = block.norm1.normalized_shape[0]

    def saved(batch: int) -> int:
        x = torch.randn(batch, tokens, width, device=device, requires_grad=True)
        cond = torch.randn(batch, width, device=device, requires_grad=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision != "no"):
            return saved_bytes(lambda: block(x, cond, mask), exclude)

    return saved


def block_bytes_per_token_width(
    width: int = 128, patch_nums: tuple[int, ...] = VAR_PATCHES, precision: str = "bf16",
    preset: str = "cart-d30-256", device: str = "cpu", attention: str = TRAINING_ATTENTION,
) -> float:  # fmt: skip
    """Bytes autograd saves per token and width unit for one transformer block of ``preset``'s
    options at ``width`` on the block-causal schedule of ``patch_nums`` through the training
    attention path ``attention`` (``sdpa`` or ``per_step``; flex has no CPU backward), under
    ``precision`` (bf16 autocast or fp32): the difference between a batch of 2 and of 1, so
    that weights and masks do not count."""
    schedule = TokenSchedule.var(patch_nums)
    if attention == "sdpa":
        mask = schedule.attn_mask(device)
    elif attention == "per_step":
        mask = BlockCausal.build(schedule, attention, device)
    else:
        raise ValueError(f"attention={attention!r}: measure 'sdpa' or 'per_step' on the CPU")
    block = _probe_block(width, preset, device)
    saved = _block_saves(block, mask, schedule.seq_len, precision, device)
    return (saved(2) - saved(1)) / (schedule.seq_len * width)


def weight_copy_bytes_per_param(
    precision: str = "bf16", width: int = 128, tokens: int = 64, preset: str = "cart-d30-256",
    device: str = "cpu",
) -> float:  # fmt: skip
    """Bytes per parameter that one block saves for backward whatever the batch (batch 1 minus
    the batch-proportional part): under autocast, the low-precision copies of its weights the
    matmuls keep; its own fp32 parameters are not counted. Dense attention (no mask)."""
    block = _probe_block(width, preset, device)
    saved = _block_saves(block, None, tokens, precision, device)
    one, two = saved(1), saved(2)
    return (2 * one - two) / sum(p.numel() for p in block.parameters())


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
    precision: str = "bf16",
    **options,
) -> Fit:
    """The cheapest layout of ``global_batch`` over ``world`` GPUs of ``gpu_mem_gib`` each,
    training in ``precision``; ``options`` (attention, bucket_view, fused) as
    :func:`training_memory` takes them, the training loop's settings by default."""
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
            peak = training_memory(
                n_params, depth, width, seq_len, vocab, b, world, fsdp, ckpt, precision,
                accumulation=local // b, **options,
            )  # fmt: skip
            if peak["total"] <= budget:
                fit = Fit(b, local // b, fsdp, ckpt, peak["total"] / GIB)
                if b >= min(MIN_MICRO_BATCH, local):
                    return fit
                best = best or fit
                break
    if best is not None:
        return best
    one = training_memory(
        n_params, depth, width, seq_len, vocab, 1, world, world > 1, True, precision, local,
        **options,
    )  # fmt: skip
    state = one["weights"] + one["adamw"]
    raise ValueError(
        f"even micro-batch 1 with sharding and checkpointing needs ~{one['total'] / GIB:.0f} GiB "
        f"per GPU (weights and AdamW state {state / GIB:.0f} GiB over {world} GPU(s)), more "
        f"than {HEADROOM:.0%} of {gpu_mem_gib} GiB: use more GPUs or larger ones"
    )


# ------------------------------------------------------------------------------------ tokenizer
# The tokenizer stage (VQ-VAE + perceptual loss + discriminator) is a convolutional network: what
# autograd saves grows with the pixels of an image, so it is measured per pixel at a small
# resolution with the run's real architecture (channels, levels, decomposition order, losses),
# where it costs a second, and scaled to the run's resolution (tests/test_fit.py checks that the
# per-pixel figure does not depend on the resolution it is measured at).
TOKENIZER_PROBE_LATENT = 2  # the probe's latent side: resolution = 2 x the downsampling
_TOKENIZER_PROBES: dict[str, dict[str, float]] = {}  # measurements per setting, this process


def tokenizer_probe_config(cfg, latent: int = TOKENIZER_PROBE_LATENT):
    """``cfg`` at the smallest resolution its tokenizer takes (latent ``latent`` x ``latent``):
    the same architecture, losses and decomposition, the base scales cut to end at ``latent``,
    the discriminator's loss on from the first step."""
    t = cfg.tokenizer
    patches = tuple(p for p in t.base_patch_nums if p < latent) + (latent,)
    return cfg.updated(
        data={"resolution": latent * downsample_factor(t.ch_mult)},
        tokenizer={"base_patch_nums": patches, "gan_start": 0},
    )


def _probe_networks(cfg, latent: int = TOKENIZER_PROBE_LATENT, device: str = "cpu"):
    """(probe config, tokenizer in training mode with its codebook marked initialised, compound
    loss, perceptual network or None, inputs(batch) -> (images, bases or None)) of ``cfg``'s
    tokenizer at the probe resolution (:func:`tokenizer_probe_config`), on ``device``."""
    probe = tokenizer_probe_config(cfg, latent)
    t, res = probe.tokenizer, probe.data.resolution
    tok = Tokenizer(t, probe.decompose, res).train()
    tok.quantizer.initialized.fill_(True)  # no codebook initialisation inside a measurement
    with warnings.catch_warnings():  # the run itself says which perceptual network it uses
        warnings.simplefilter("ignore")
        perceptual = lpips_model(check_range=False) if t.w_lpips > 0 else None

    def inputs(batch: int):
        x = torch.rand(batch, 3, res, res, device=device)
        bases = torch.rand(batch, tok.order, 3, res, res, device=device) if tok.order else None
        return x, bases

    crit = CompoundLoss(t, perceptual).to(device)  # (the perceptual network with it)
    return probe, tok.to(device), crit, perceptual, inputs


def tokenizer_activation_probe(
    cfg, precision: str = "bf16", latent: int = TOKENIZER_PROBE_LATENT, device: str = "cpu"
) -> dict[str, float]:
    """One generator step of ``cfg``'s tokenizer (tokenizer, perceptual loss, discriminator's
    generator term) measured at a small resolution (:func:`tokenizer_probe_config`): the bytes
    autograd saves per image pixel (batch 2 minus batch 1), and the parameter counts of the
    run's own networks: trained (tokenizer and discriminator) and frozen (the perceptual
    network). Memoised per setting.
    ``precision``: ``bf16`` (autocast, as on GPUs) or ``no`` (fp32). ``device``: where to
    measure (the plan measures on the GPU when there is one: a CPU without native bf16 would
    take tens of seconds under bf16 autocast; the bytes are the same)."""
    key = f"{cfg.digest(cfg.tokenizer_sections())}-{latent}-{precision}"
    if key in _TOKENIZER_PROBES:
        return _TOKENIZER_PROBES[key]
    gpus = [torch.cuda.current_device()] if device == "cuda" else []
    with torch.random.fork_rng(devices=gpus):  # the caller's random streams stay as they were
        torch.manual_seed(0)
        probe, tok, crit, perceptual, inputs = _probe_networks(cfg, latent, device)
        t, res = probe.tokenizer, probe.data.resolution
        fixed = [*tok.parameters(), *tok.buffers(), *crit.parameters(), *crit.buffers()]
        exclude = {p.untyped_storage().data_ptr() for p in fixed}
        half = precision in ("bf16", "fp16")

        def measure(batch: int) -> int:
            x, bases = inputs(batch)

            def step():
                with torch.autocast(device, torch.bfloat16, enabled=half):
                    out = tok(x, bases)
                    crit.generator_loss(out, out.target, out.target_base, t.gan_start)

            return saved_bytes(step, exclude)

        per_pixel = (measure(2) - measure(1)) / res**2

    with torch.device("meta"):  # the run's own tokenizer (its schedule's phi convs) is counted
        run_tok = Tokenizer(cfg.tokenizer, cfg.decompose, cfg.data.resolution)
    trained = sum(p.numel() for p in run_tok.parameters())
    trained += sum(p.numel() for p in crit.disc.parameters()) if crit.disc is not None else 0
    frozen = sum(p.numel() for p in perceptual.parameters()) if perceptual is not None else 0
    copies = WEIGHT_COPY_BYTES["no" if precision == "no" else "bf16"]  # per parameter
    result = {"bytes_per_pixel": per_pixel, "trained_params": trained, "frozen_params": frozen,
              "weight_copy_bytes": copies}  # fmt: skip
    _TOKENIZER_PROBES[key] = result
    return result


def tokenizer_memory(
    probe: dict[str, float], resolution: int, micro_batch: int, world: int = 1
) -> dict[str, float]:
    """Estimated peak bytes per GPU of one tokenizer training step, by part (and ``"total"``),
    from :func:`tokenizer_activation_probe`'s measurement: AdamW's state of the tokenizer and
    discriminator (weights, gradients, moments; over several GPUs the gradients are views of
    DDP's bucket, nothing apart), the frozen perceptual network, the low-precision weight copies
    autocast keeps for backward (of both: the frozen network's too, for the gradient of its
    input) and the activations of ``micro_batch`` images of ``resolution`` squared. ``world``
    does not change it (kept for the callers that pass it)."""
    trained, frozen = probe["trained_params"], probe["frozen_params"]
    parts = {
        "state": STATE_BYTES_PER_PARAM * trained,
        "frozen": 4 * frozen,
        "weight_copies": probe.get("weight_copy_bytes", 0.0) * (trained + frozen),
        "activations": probe["bytes_per_pixel"] * resolution**2 * micro_batch,
    }
    parts["total"] = sum(parts.values())
    return parts


def choose_tokenizer_fit(
    probe: dict[str, float], resolution: int, global_batch: int, world: int, gpu_mem_gib: float
) -> Fit:
    """The largest micro-batch (dividing the per-GPU batch) whose tokenizer step fits
    ``gpu_mem_gib``; the rest of the batch is accumulated. Replicated (DDP), no checkpointing."""
    if global_batch % world:
        raise ValueError(
            f"the tokenizer's batch_size {global_batch} does not split evenly over {world} "
            f"processes: choose a batch_size divisible by {world}"
        )
    local = global_batch // world
    budget = HEADROOM * gpu_mem_gib * GIB
    for b in _divisors_desc(local):
        peak = tokenizer_memory(probe, resolution, b, world)["total"]
        if peak <= budget:
            return Fit(b, local // b, False, False, peak / GIB)
    one = tokenizer_memory(probe, resolution, 1, world)["total"]
    raise ValueError(
        f"one {resolution}px image per tokenizer step needs ~{one / GIB:.0f} GiB per GPU, more "
        f"than {HEADROOM:.0%} of gpu_mem_gib={gpu_mem_gib}: use larger GPUs or a smaller "
        f"tokenizer (channels, ch_mult)"
    )


# ------------------------------------------------------------------------------------- GPU-hours
# What a full-scale run costs, stage by stage: floating-point operations counted by torch's
# FlopCounterMode (the transformer on the meta device at its real size; the tokenizer on the
# CPU at the 32-pixel probe, scaled by the pixels as its memory is), divided by a GPU's dense
# bf16 rate times an assumed model-FLOP utilisation. The utilisations are assumptions, not
# measurements (no GPU has run cartlib yet): benchmarks/gpu_check.py measures the throughput
# that replaces them. Not counted: the per-batch decomposition and data loading.
A100_BF16_TFLOPS = 312.0  # dense, per GPU
ASSUMED_MFU = {"tokenizer": 0.3, "extract": 0.3, "ar": 0.4, "sample": 0.15}
IMAGENET_TRAIN = 1_281_167
FID_SAMPLES = 50_000


def ar_forward_flops(cfg, num_classes: int = 1000) -> float:
    """Floating-point operations of one image's teacher-forced transformer forward, attention
    counted dense (all L² query-key pairs, as the ``sdpa`` reference computes them; the faster
    paths compute the block-causal pairs only, but the model's FLOPs are the same for all)."""
    schedule = cfg.schedule()
    model = build_model(cfg, schedule, num_classes, device="meta")
    model.attention = "sdpa"  # the per-step plan reads its mask's values: not on the meta device
    first = schedule[0].h * schedule[0].w
    labels = torch.zeros(1, dtype=torch.long, device="meta")
    inputs = torch.empty(1, schedule.seq_len - first, cfg.tokenizer.latent_channels, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(labels, inputs)
    return float(counter.get_total_flops())


def tokenizer_forward_flops(cfg) -> dict[str, float]:
    """Per image at the run's resolution: ``train``, the tokenizer's training forward with its
    losses (perceptual network, discriminator); ``encode``, the tokenization of one view."""
    key = f"flops-{cfg.digest(cfg.tokenizer_sections())}"
    if key in _TOKENIZER_PROBES:
        return _TOKENIZER_PROBES[key]
    probe, tok, crit, _, inputs = _probe_networks(cfg)
    t, res = probe.tokenizer, probe.data.resolution
    x, bases = inputs(1)
    scale = (cfg.data.resolution / res) ** 2
    out = {}
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            o = tok(x, bases)
            crit.generator_loss(o, o.target, o.target_base, t.gan_start)
            crit.discriminator_loss(o.recon, o.target)
        out["train"] = counter.get_total_flops() * scale
        with FlopCounterMode(display=False) as counter:
            tok.encode(x, bases)
        out["encode"] = counter.get_total_flops() * scale
    _TOKENIZER_PROBES[key] = out
    return out


def gpu_hours(
    cfg, train_images: int = IMAGENET_TRAIN, samples: int = FID_SAMPLES,
    tflops: float = A100_BF16_TFLOPS, mfu: dict[str, float] | None = None,
) -> dict[str, float]:  # fmt: skip
    """Estimated GPU-hours of each stage of ``cfg`` (and ``"total"``): tokenizer training,
    token extraction (every training image in ``data.views`` views), transformer training and
    sampling ``samples`` images with classifier-free guidance (two forwards per image; the
    decoder's cost is small beside them and not counted). Training = 3 x the forward."""
    mfu = {**ASSUMED_MFU, **(mfu or {})}
    t, a = cfg.tokenizer, cfg.ar
    tok = tokenizer_forward_flops(cfg)
    ar = ar_forward_flops(cfg)
    flops = {
        "tokenizer": 0.0 if t.init_from else 3 * tok["train"] * t.steps * t.batch_size,
        "extract": tok["encode"] * train_images * cfg.data.views,
        "ar": 3 * ar * a.steps * a.batch_size,
        "sample": 2 * ar * samples,
    }
    hours = {k: v / (tflops * 1e12 * mfu[k]) / 3600 for k, v in flops.items()}
    hours["total"] = sum(hours.values())
    return hours
