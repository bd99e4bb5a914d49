"""Checkpoints under FSDP: every rank writes its shard (torch.distributed.checkpoint), a stopped
run resumes to the same next step, and the consolidated export loads in a plain process.

torch's FSDP2 runs over gloo on CPUs (torch 2.14: all-gather and reduce-scatter are there), so
these run 2 real processes (tests/launching.py) and, for the checkpoint guarantees, a gloo world
of one process inside pytest.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from launching import accelerate_launch, free_port
from layout_probe import setup
from torch import nn
from torch.distributed.fsdp import fully_shard

from cartlib.io import DIST_TIMEOUT
from cartlib.model import build_model
from cartlib.train import build_optimizer, load_ar, load_latest, train_ar
from cartlib.train import sharded as sharded_mod
from cartlib.train.checkpoints import MANIFEST, save_checkpoint
from cartlib.train.sharded import load_shards, save_shards, whole_state_dicts

PROBE = Path(__file__).with_name("fsdp_probe.py")
TOLERANCE = 5e-5  # max |parameter difference| FSDP (2 x b) vs plain (1 x 2b), as tests/test_layout


@pytest.fixture(autouse=True)
def _keep_threads():
    """layout_probe.setup() pins torch to one thread; later tests in this process compare
    in-process runs with subprocess runs bit for bit, so the count is restored."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _plain_run(tmp: Path) -> dict:
    """The same 3 steps in this process, unsharded, with the whole batch."""
    threads = torch.get_num_threads()
    try:
        cfg, tok, tokens, labels = setup()
        model, _ = train_ar(cfg, tmp / "plain", tok, tokens, labels, 10, progress=False)
    finally:
        torch.set_num_threads(threads)
    return model.state_dict()


def test_fsdp_run_stopped_and_resumed_matches_and_its_export_loads_without_a_process_group(
    tmp_path,
):
    whole, stopped, micro = tmp_path / "whole", tmp_path / "stopped", tmp_path / "micro"
    bf16, bf16_stopped = tmp_path / "bf16", tmp_path / "bf16-stopped"
    runs = [f"{whole}:0", f"{stopped}:2", f"{micro}:0:2"]  # micro: 2 x 2 accumulation per rank
    runs += [f"{bf16}:0:0:bf16", f"{bf16_stopped}:2:0:bf16"]  # bf16 policy + stochastic depth
    accelerate_launch([PROBE, tmp_path / "a.pt", *runs], 2)
    resume = [f"{stopped}:0", f"{bf16_stopped}:0:0:bf16"]
    accelerate_launch([PROBE, tmp_path / "b.pt", *resume], 2)  # a new launch resumes
    first, second = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert first["processes"] == second["processes"] == 2
    assert first["timeout_s"] == DIST_TIMEOUT.total_seconds() == 7200  # not NCCL's 10 minutes
    ref, resumed = first["runs"][str(whole)], second["runs"][str(stopped)]
    assert sorted(first["runs"][str(stopped)]["loss"]) == [0, 1]  # it stopped after 2 steps
    assert resumed["loss"][2] == ref["loss"][2]  # the next step after resuming, bit for bit
    assert _max_diff(resumed["params"], ref["params"]) == 0.0
    # the cluster's policy: bf16 compute, but the residual stream (as under DDP + autocast:
    # issue 35, 5: it was bf16, so CART's FSDP arm computed otherwise than VAR's DDP arm), the
    # logits, the loss and every gradient reduction in fp32
    fp32 = ["float32"]
    assert first["runs"][str(bf16)]["dtypes"] == {
        "residual": fp32, "logits": fp32, "loss": fp32, "reduce": fp32,
        "grads": ["bfloat16", "float32"],  # the blocks' in bf16, the root's (embeddings, head) fp32
    }  # fmt: skip
    assert ref["dtypes"] == {
        "residual": fp32, "logits": fp32, "loss": fp32, "grads": fp32, "reduce": fp32
    }  # fmt: skip
    # ... and it resumes bit for bit too: each rank's own DropPath stream comes back
    assert first["runs"][str(bf16)]["streams"] == 2  # the ranks draw different masks
    bf_ref, bf_resumed = first["runs"][str(bf16)], second["runs"][str(bf16_stopped)]
    assert bf_resumed["loss"][2] == bf_ref["loss"][2]
    assert _max_diff(bf_resumed["params"], bf_ref["params"]) == 0.0
    # host memory (issue 35, 8): one whole model per run, built by the main process and
    # broadcast into the others' shards (every rank built one: 8 GB each at d30), and the
    # consolidated export read back by the main process alone (every rank read it)
    # per rank: (whole models built in host memory, the export read): rank 0 builds the initial
    # model and the export it reads back; rank 1 neither (before: (2, True) on every rank)
    assert ref["built"] == [(2, True), (0, False)]
    # gradient accumulation under FSDP2: reduce-scattered once, after the last micro-batch
    accumulated = _max_diff(first["runs"][str(micro)]["params"], ref["params"])
    print(f"FSDP with 2 micro-batches vs whole per-rank batch: max |diff| {accumulated:.3g}")
    assert accumulated < TOLERANCE

    folder = next(whole.glob("ar-*"))
    entries = json.loads((folder / MANIFEST).read_text())["checkpoints"]
    assert [e["step"] for e in entries] == [3, 2]  # checkpointed every step, the last 2 kept
    for e in entries:  # one shard file per rank, each listed with its sha256
        files = e["shards"]["files"]
        assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(files)
        assert all(len(f["sha256"]) == 64 for f in files.values())
    assert sorted(p.name for p in folder.glob("*.dcp")) == [
        "step-00000002.dcp",
        "step-00000003.dcp",
    ]
    assert not list(folder.glob(".*.partial"))

    assert not dist.is_initialized()  # the export loads in a plain process
    cfg, tok, _, _ = setup()
    exported = load_ar(folder, tok).state_dict()
    assert _max_diff(exported, ref["params"]) == 0.0
    plain = _plain_run(tmp_path)
    moved = max((plain[k] - v).abs().max().item() for k, v in _initial(cfg, tok).items())
    diff = _max_diff(exported, plain)
    print(f"FSDP 2 processes vs plain 1 process, 3 steps: max |diff| {diff:.3g}, moved {moved:.3g}")
    assert moved > 100 * TOLERANCE and diff < TOLERANCE


def _initial(cfg, tok) -> dict:
    torch.manual_seed(cfg.ar.seed)
    return build_model(cfg, tok.schedule, 10).state_dict()


# ------------------------------------------------------------ checkpoint guarantees, world of 1
@pytest.fixture
def world_of_one():
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def _sharded_net(shard: bool = True):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    if shard:
        fully_shard(net[0])
        fully_shard(net)
    return net, build_optimizer(net, lr=0.1, weight_decay=0.05)  # named groups, as training


def _step(net, opt) -> float:
    loss = net(torch.linspace(-1, 1, 12).view(3, 4)).pow(2).sum()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def _save(folder: Path, step: int, net, opt) -> None:
    name, files = save_shards(folder, step, {"net": net}, {"opt": opt})
    save_checkpoint(folder, {"step": step, "sharded": name}, keep=2, shards=files)


def test_sharded_checkpoints_keep_two_survive_a_crash_and_skip_a_corrupt_shard(
    tmp_path, world_of_one, monkeypatch
):
    net, opt = _sharded_net()
    for step in (1, 2, 3):
        _step(net, opt)
        _save(tmp_path, step, net, opt)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == [
        "step-00000002.dcp", "step-00000002.pt", "step-00000003.dcp", "step-00000003.pt"
    ]  # fmt: skip
    expected = _step(net, opt)  # step 4 after the checkpoint of step 3

    def crash(state, checkpoint_id):  # dies after writing part of the shards
        Path(checkpoint_id).mkdir()
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"half")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(sharded_mod.dcp, "save", crash)
        with pytest.raises(KeyboardInterrupt):
            _save(tmp_path, 4, net, opt)
    state, path = load_latest(tmp_path, shards=True)
    assert state["step"] == 3  # the crash left the previous checkpoint listed and whole

    for shard in (True, False):  # resumes to the same next step, also without FSDP
        fresh, fresh_opt = _sharded_net(shard)
        load_shards(tmp_path / state["sharded"], {"net": fresh}, {"opt": fresh_opt})
        assert _step(fresh, fresh_opt) == pytest.approx(expected, abs=0 if shard else 1e-6)

    shard = tmp_path / "step-00000003.dcp" / "__0_0.distcp"
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    shard.write_bytes(bytes(blob))
    with pytest.warns(UserWarning, match=r"its shard .*__0_0.distcp: its sha256 differs"):
        state, _ = load_latest(tmp_path, shards=True)
    assert state["step"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # readers of the file alone do not hash the shards
        assert load_latest(tmp_path)[0]["step"] == 3

    _save(tmp_path, 5, net, opt)  # the next save clears the crashed one's partial folder
    assert not list(tmp_path.glob(".*.partial"))


def test_consolidated_export_is_the_plain_state_dict(world_of_one):
    net, opt = _sharded_net()
    _step(net, opt)
    whole = whole_state_dicts({"net": net})["net"]
    plain = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    plain.load_state_dict(whole)  # strict: same keys and shapes, plain tensors
    assert all(type(v) is torch.Tensor for v in whole.values())
    full = {k: v.full_tensor() for k, v in net.state_dict().items()}
    assert _max_diff(plain.state_dict(), full) == 0.0
