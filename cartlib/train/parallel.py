"""Memory savers for large transformers, from torch itself: activation checkpointing per block
and FSDP2 full sharding per block (``torch.distributed.fsdp.fully_shard``).

On GPUs under ``accelerate launch`` FSDP comes from accelerate's plugin (:func:`fsdp_plugin`), which
wraps the same units; :func:`shard_per_block` is the direct torch call for places accelerate does
not cover (one-process checks in ``benchmarks/gpu_check.py``, FSDP over gloo on CPUs in tests).
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

from cartlib.model.transformer import Block

PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def checkpoint_blocks(model: nn.Module) -> nn.Module:
    """Recompute every transformer block's activations in backward (non-reentrant checkpoint):
    memory for activations drops from depth x one block to depth x block input + one block."""
    wrapper = functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: isinstance(m, Block)
    )
    return model


def shard_per_block(model: nn.Module, mixed_precision: str = "no") -> nn.Module:
    """FSDP2 full sharding with one unit per block plus the root (embeddings and head); fp32
    master weights, compute in ``mixed_precision``, gradients reduced in fp32. Needs an
    initialised process group (gloo on CPUs, nccl on GPUs)."""
    policy = MixedPrecisionPolicy(
        param_dtype=PRECISION.get(mixed_precision), reduce_dtype=torch.float32
    )
    for module in list(model.modules()):
        if isinstance(module, Block):
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def fsdp_plugin(checkpointing: bool):
    """accelerate's FSDP2 plugin with the same units as :func:`shard_per_block`: full sharding,
    per-block wrapping, sharded state dicts for resumable checkpoints."""
    from accelerate.utils import FullyShardedDataParallelPlugin  # imported where FSDP is used

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=True,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=[Block.__name__],
        state_dict_type="SHARDED_STATE_DICT",
        activation_checkpointing=checkpointing,
        cpu_ram_efficient_loading=False,
    )


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
