"""Memory savers for large transformers, from torch itself: activation checkpointing per block
and FSDP2 full sharding per block (``torch.distributed.fsdp.fully_shard``).

There is one FSDP path, the same on CPUs (gloo, the tests) and GPUs (nccl, a cluster):
:func:`shard_per_block` shards the model itself before accelerate prepares the optimizer, with one
mixed-precision policy (bf16 parameters in compute, fp32 master weights, gradients reduce-scattered
in fp32; the loss is computed in fp32 by :func:`cartlib.train.ar.ar_loss`). accelerate's FSDP
plugin is not used: it shards on GPUs only, so a CPU test could never reach it; its default policy
reduces gradients and casts the model's output in bf16; its activation checkpointing does not
preserve the RNG state (stochastic depth would recompute with another mask in backward); and a
second ``Accelerator`` in one process silently ignores it. :func:`checkpoint_blocks` (torch's
non-reentrant checkpoint, RNG state preserved) serves with and without FSDP.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from cartlib.hardware import HALF_DTYPES
from cartlib.model.transformer import Block


def checkpoint_blocks(model: nn.Module) -> nn.Module:
    """Recompute every transformer block's activations in backward (non-reentrant checkpoint):
    memory for activations drops from depth x one block to depth x block input + one block.
    The RNG state is preserved, so the recomputation draws the forward's DropPath masks."""
    wrapper = functools.partial(
        checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=True
    )
    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: isinstance(m, Block)
    )
    return model


def sharding_policy(mixed_precision: str, root: bool = False) -> MixedPrecisionPolicy:
    """FSDP2's mixed precision for ``mixed_precision`` (no | bf16). A block's parameters are
    gathered in that dtype for compute and its input is left as it comes (the residual stream
    stays fp32, as under DDP with autocast); the root's (embeddings, head) are gathered in fp32;
    every gradient is reduce-scattered in fp32. Under autocast both layouts then compute the
    same dtypes where it matters — the residual stream fp32, the logits bf16 (then fp32 in the
    loss), the loss fp32 — so CART's FSDP arm and VAR's DDP arm of Table 1 are not confounded by
    their layouts (tests/test_fsdp.py)."""
    if mixed_precision == "fp16":
        raise ValueError(
            "ar.fsdp=True with mixed_precision='fp16': fp16 needs a gradient scaler that works "
            "on sharded gradients, which cartlib does not use; train in 'bf16' (A100, H100 and "
            "later GPUs) or 'no', or set ar.fsdp=False"
        )
    half = None if root else HALF_DTYPES.get(mixed_precision)
    return MixedPrecisionPolicy(
        param_dtype=half, reduce_dtype=torch.float32, cast_forward_inputs=False
    )


def shard_per_block(model: nn.Module, mixed_precision: str = "no") -> nn.Module:
    """FSDP2 full sharding with one unit per block plus the root (embeddings and head), with
    :func:`sharding_policy`. Needs an initialised process group (gloo on CPUs, nccl on GPUs);
    the shards go to the process's device."""
    for module in list(model.modules()):
        if isinstance(module, Block):
            fully_shard(module, mp_policy=sharding_policy(mixed_precision))
    fully_shard(model, mp_policy=sharding_policy(mixed_precision, root=True))
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, accelerator, sync: bool):
    """Backward of one micro-batch with (``sync``) or without the cross-process gradient
    reduction. Non-final micro-batches skip it: DDP through ``accelerator.no_sync``; FSDP2
    modules, for which ``no_sync`` does nothing, through ``set_requires_gradient_sync(False)``
    (gradients then accumulate unsharded until the last micro-batch reduce-scatters them once)."""
    if sync:
        yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2 (fully_shard)
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with accelerator.no_sync(model):
            yield
