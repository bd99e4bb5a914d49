"""FSDP checkpoints through ``torch.distributed.checkpoint`` (DCP): every rank writes its shard.

* :func:`save_shards` writes the weights and AdamW moments of the modules into
  ``step-<step>.dcp`` (as ``.step-<step>.dcp.partial`` until complete, then renamed) and returns
  every file's sha256 and size, each rank hashing a share of the files; :func:`load_shards` reads
  them back at any process count (DCP reshards).
* :func:`whole_state_dicts` gathers the unsharded weights on the main process: the consolidated
  export that sampling loads on one GPU or a CPU without a process group.

The state dicts come from ``torch.distributed.checkpoint.state_dict`` (parameter names as keys,
DTensor shards as values), which serves plain modules too: a run started under FSDP resumes
without it. The manifest and the single-file part are :mod:`cartlib.train.checkpoints`'s.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule

from cartlib.io import sha256_file
from cartlib.train.checkpoints import CheckpointError
from cartlib.trust import UnsafeFileError, restricted_load


def is_sharded(*modules: nn.Module) -> bool:
    """Whether any of ``modules`` (unwrapped) is sharded by FSDP2."""
    return any(isinstance(m, FSDPModule) for m in modules)


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _owner(optimizer, modules: dict[str, nn.Module]) -> nn.Module:
    """The module whose parameters ``optimizer`` updates."""
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for module in modules.values():
        if ids <= {id(p) for p in module.parameters()}:
            return module
    raise ValueError(
        f"an optimizer updates parameters of none of the modules {sorted(modules)}: give each "
        "optimizer's module to the training loop under the same run"
    )


def _state(modules, optimizers) -> dict[str, Any]:
    """Sharded state dicts of ``modules`` and ``optimizers`` (their moments initialised)."""
    return {
        "modules": {n: get_model_state_dict(m) for n, m in modules.items()},
        "optimizers": {
            n: get_optimizer_state_dict(_owner(o, modules), o) for n, o in optimizers.items()
        },
    }


def save_shards(
    folder: Path, step: int, modules, optimizers
) -> tuple[str, dict[str, dict[str, Any]] | None]:
    """Collective: every rank writes its shards of ``modules`` and ``optimizers`` (unwrapped)
    into ``folder/step-<step>.dcp``. -> (that folder's name, {file: {sha256, bytes}} on the main
    process, None on the others). A crash leaves only a ``.partial`` folder, removed next time."""
    name = f"step-{step:08d}.dcp"
    partial = folder / f".{name}.partial"
    rank, world = rank_world()
    if rank == 0:
        for old in folder.glob(".step-*.dcp.partial"):  # left by a crashed save
            shutil.rmtree(old)
    if world > 1:
        dist.barrier()
    dcp.save(_state(modules, optimizers), checkpoint_id=partial)  # fsyncs its files
    files = [sorted(p.name for p in partial.iterdir()) if rank == 0 else None]
    if world > 1:  # rank 0's listing for all (a shared disk may list stale entries elsewhere)
        dist.broadcast_object_list(files, src=0)
    files = files[0]
    mine = {
        f: {"sha256": sha256_file(partial / f), "bytes": (partial / f).stat().st_size}
        for f in files[rank::world]
    }
    parts = [mine]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, mine)
    if rank != 0:
        return name, None
    if (folder / name).exists():  # not listed (a crash after the rename) or being replaced
        shutil.rmtree(folder / name)
    os.replace(partial, folder / name)  # made durable by the manifest's folder fsync
    return name, {f: h for part in parts for f, h in part.items()}


# The globals a DCP ``.metadata`` pickle names (torch 2.14's Metadata of tensors and bytes entries)
DCP_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size", *(str(d).removeprefix("torch.") for d in (
        torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
        torch.int16, torch.int8, torch.uint8, torch.bool))},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}  # fmt: skip


class _Reader(dcp.FileSystemReader):
    """DCP's file reader with the metadata unpickled through :func:`cartlib.trust.
    restricted_load` (DCP's own reader runs ``pickle.load`` on it: a run folder could carry
    code)."""

    refused: UnsafeFileError | None = None  # what it refused (DCP reports it as text)

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = restricted_load(f, DCP_METADATA_GLOBALS, name=str(path))
            except UnsafeFileError as e:
                self.refused = e
                raise
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _Planner(DefaultLoadPlanner):
    """DCP's load planner with the non-tensor entries (AdamW's hyper-parameters, the parameter
    names) read by ``torch.load(weights_only=True)``, where DCP's own planner unpickles anything."""

    refused: UnsafeFileError | None = None

    def load_bytes(self, read_item, value) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            self.refused = UnsafeFileError(
                f"the entry {read_item.dest_index.fqn} of a sharded checkpoint was refused: "
                f"loading it would run code ({str(e).splitlines()[0]}). Nothing from it was run"
            )
            raise self.refused from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def load_shards(path: Path, modules, optimizers) -> None:
    """Collective: load ``modules`` and ``optimizers`` (unwrapped) from the DCP folder ``path``
    without running code from it (:class:`_Reader`, :class:`_Planner`)."""
    state = _state(modules, optimizers)
    reader, planner = _Reader(path), _Planner()
    try:
        dcp.load(state, storage_reader=reader, planner=planner)
    except CheckpointException as e:  # a BaseException, holding every rank's error as text
        if reader.refused or planner.refused:
            raise (reader.refused or planner.refused) from None
        if "was refused" in str(e):  # another rank refused it
            raise UnsafeFileError(f"{path} was refused by another process:\n{e}") from None
        raise CheckpointError(
            f"the sharded checkpoint {path} cannot be read:\n{e}\nMove the folder away to "
            "resume from the checkpoint before it, or restore a copy"
        ) from None
    for n, m in modules.items():
        set_model_state_dict(m, state["modules"][n])
    for n, o in optimizers.items():
        set_optimizer_state_dict(_owner(o, modules), o, state["optimizers"][n])


def whole_state_dicts(modules) -> dict[str, dict]:
    """Collective: the unsharded fp32 state dicts of ``modules`` on the CPU of the main process
    (empty dicts on the others), keyed as a plain module's ``state_dict()``."""
    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {n: get_model_state_dict(m, options=whole) for n, m in modules.items()}
