"""Train the layout probe's transformer under FSDP (torch's FSDP2 over gloo on CPUs) and save
what each run returned: ``python tests/fsdp_probe.py OUT RUN_DIR:STOP_AFTER[:MICRO[:PRECISION]]
...`` trains each run directory in turn (STOP_AFTER 0 = to the end; MICRO a micro-batch for
gradient accumulation, 0 none; PRECISION no (default) or bf16, the latter with stochastic depth
on so that each rank's RNG matters), checkpointing every step. Used by tests/test_fsdp.py under
``accelerate launch`` with 2 CPU processes.

It also records, per run, the dtypes that matter at scale: the residual stream (each block's
output), the logits reaching the loss, the loss itself, the gradients as computed and the dtype
FSDP reduce-scatters them in (by wrapping torch's ``foreach_reduce``, the call every FSDP2
gradient reduction goes through), how many distinct RNG states the ranks end with, and the
process group's collective timeout.
"""

from __future__ import annotations

import inspect
import sys

import torch
import torch.distributed as dist
from layout_probe import setup
from torch.distributed.fsdp._fully_shard import _fsdp_param_group

import cartlib.train.ar as ar_mod
from cartlib.launch import leave_process_group
from cartlib.model.transformer import Block
from cartlib.train import train_ar

SEEN: dict[str, set[str]] = {}


def _record(key: str, dtype: torch.dtype) -> None:
    SEEN.setdefault(key, set()).add(str(dtype).removeprefix("torch."))


def _wrap_dtypes() -> None:
    loss_fn, reduce_fn = ar_mod.ar_loss, _fsdp_param_group.foreach_reduce
    signature = inspect.signature(reduce_fn)

    def ar_loss(logits, *args):
        _record("logits", logits.dtype)
        out = loss_fn(logits, *args)
        _record("loss", out[0].dtype)
        return out

    def foreach_reduce(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        grads = bound["unsharded_grads"]
        _record("grads", grads[0].dtype)  # as computed: in the policy's parameter dtype
        _record("reduce", bound["reduce_dtype"] or grads[0].dtype)
        return reduce_fn(*args, **kwargs)

    ar_mod.ar_loss = ar_loss
    _fsdp_param_group.foreach_reduce = foreach_reduce


def record_residual(model) -> None:
    """The dtype of the residual stream: each block's output (a forward hook)."""
    for m in model.modules():
        if isinstance(m, Block):
            m.register_forward_hook(lambda mod, args, out: _record("residual", out.dtype))


build_model = ar_mod.build_model


BUILT: list[str] = []  # the devices this process built transformers on (host memory: "cpu")


def _hooked(build):
    def build_and_hook(*args, **kwargs):
        model = build(*args, **kwargs)
        BUILT.append(str(kwargs.get("device") or "cpu"))
        record_residual(model)
        return model

    return build_and_hook


def main(out: str, *runs: str) -> None:
    _wrap_dtypes()
    results = {}
    for spec in runs:
        run_dir, stop, *rest = spec.split(":")
        micro, precision = (int(rest[0]) if rest else 0), (rest[1] if len(rest) > 1 else "no")
        extra = {"drop_path": 0.3} if precision == "bf16" else {}
        cfg, tok, tokens, labels = setup(micro, fsdp=True, ckpt_every=1, **extra)
        cfg = cfg.updated(mixed_precision=precision)
        SEEN.clear()
        BUILT.clear()
        ar_mod.build_model = _hooked(build_model)
        model, history = train_ar(
            cfg, run_dir, tok, tokens, labels, 10, progress=False, stop_after=int(stop) or None
        )
        losses = {h["step"]: h["loss"] for h in history}
        dtypes = {k: sorted(v) for k, v in SEEN.items()}
        streams = [None] * dist.get_world_size()  # each rank's RNG: its own DropPath masks
        dist.all_gather_object(streams, torch.get_rng_state())
        distinct = len({bytes(t.numpy()) for t in streams})
        built = [None] * dist.get_world_size()  # per rank: whole models in host memory, exports
        dist.all_gather_object(built, (BUILT.count("cpu"), model is not None))
        results[run_dir] = {
            "params": model and model.state_dict(), "loss": losses, "dtypes": dtypes,
            "streams": distinct, "built": built,
        }  # fmt: skip
    backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
    timeout = backend.options._timeout.total_seconds()  # how long a collective may wait
    if dist.get_rank() == 0:
        torch.save({"runs": results, "processes": dist.get_world_size(), "timeout_s": timeout}, out)
    leave_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
