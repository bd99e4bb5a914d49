"""Run folders, data folders and downloaded weights are input, not code (issue 37): a planted
pickle is refused by every entry point, by name, and nothing from it runs; cartlib's own files
(and older ones holding numpy's RNG state) load with ``weights_only=True``."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import ar_setup

from cartlib import runs, shipped, stages, train
from cartlib.__main__ import main as cli
from cartlib.config import save_config
from cartlib.data import arrays
from cartlib.io import load_checkpoint, sha256_file
from cartlib.train.checkpoints import MANIFEST, read_manifest
from cartlib.train.loop import rng_state, set_rng_state
from cartlib.train.sharded import _Planner, load_shards
from cartlib.trust import UnsafeFileError, load_torch, restricted_load

REPO = Path(__file__).resolve().parents[1]


class Plant:
    """Unpickling it would create the file ``marker`` (what a hostile pickle would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_global_is_refused_by_name_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"weights": torch.ones(2), "x": Plant(marker)}, tmp_path / "ckpt.pt")
    with pytest.raises(UnsafeFileError, match=r"ckpt.pt was refused: loading it would call "
                       r"(builtins|io)\.open.*Nothing from it was run"):  # fmt: skip
        load_checkpoint(tmp_path / "ckpt.pt")
    assert not marker.exists()


def test_older_checkpoints_with_numpys_rng_state_still_load_and_resume_the_stream(tmp_path):
    """Before 2026-12-07 a checkpoint held np.random.get_state() (an ndarray): it loads under
    weights_only with exactly numpy's array pieces admitted; the new format holds tensors."""
    old = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": None}
    torch.save({"step": 3, "rng": old}, tmp_path / "old.pt")
    wanted = torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "old.pt")
    assert any("ndarray" in g for g in wanted)  # the case the allowlist exists for
    expect = np.random.rand(3)
    state = load_checkpoint(tmp_path / "old.pt")["rng"]
    import random

    state["python"] = random.getstate()
    set_rng_state(state)
    assert np.array_equal(np.random.rand(3), expect)
    torch.save({"rng": rng_state()}, tmp_path / "new.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "new.pt") == []
    new = torch.load(tmp_path / "new.pt", weights_only=True)["rng"]  # plain torch, no allowlist
    expect = np.random.rand(2)
    set_rng_state(new)
    assert np.array_equal(np.random.rand(2), expect)


def test_an_ndarray_admitted_for_old_rng_states_cannot_smuggle_a_global(tmp_path):
    """Object arrays are rebuilt by the same restricted unpickler: their contents are checked."""
    marker = tmp_path / "ran"
    arr = np.empty(1, dtype=object)
    arr[0] = Plant(marker)
    torch.save({"rng": {"numpy": ("MT19937", arr, 0, 0, 0.0)}}, tmp_path / "obj.pt")
    with pytest.raises(UnsafeFileError, match=r"(builtins|io)\.open"):
        load_torch(tmp_path / "obj.pt")
    assert not marker.exists()


def test_cifar_batches_load_through_an_allowlist_and_a_planted_one_is_refused(tmp_path):
    batch = {"data": np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072), "labels": [1, 7]}
    (tmp_path / "ok").write_bytes(pickle.dumps(batch, protocol=2))
    got = arrays._unpickle(tmp_path / "ok")
    assert got["labels"] == [1, 7] and got["data"].shape == (2, 3072)
    marker = tmp_path / "ran"
    (tmp_path / "bad").write_bytes(pickle.dumps({"data": Plant(marker)}, protocol=2))
    with pytest.raises(UnsafeFileError, match=r"bad was refused.*(builtins|io)\.open"):
        arrays._unpickle(tmp_path / "bad")
    assert not marker.exists()


def test_sharded_checkpoint_metadata_and_bytes_entries_cannot_run_code(tmp_path):
    """torch.distributed.checkpoint unpickles its .metadata with plain pickle and its non-tensor
    entries with weights_only=False; cartlib's reader and planner admit only what DCP writes."""
    import torch.distributed.checkpoint as dcp

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    folder = tmp_path / "step.dcp"
    from cartlib.train.sharded import _state

    with pytest.warns(UserWarning):  # one process, no process group
        dcp.save(_state({"model": model}, {"opt": opt}), checkpoint_id=folder)
    again = torch.nn.Linear(3, 2)
    again_opt = torch.optim.AdamW(again.parameters())
    with pytest.warns(UserWarning):
        load_shards(folder, {"model": again}, {"opt": again_opt})  # a good one loads
    assert torch.equal(again.weight, model.weight)
    marker = tmp_path / "ran"
    (folder / ".metadata").write_bytes(pickle.dumps(Plant(marker)))
    with pytest.raises(UnsafeFileError, match=r"\.metadata was refused.*(builtins|io)\.open"):
        load_shards(folder, {"model": again}, {"opt": again_opt})
    buf = io.BytesIO()
    torch.save(Plant(marker), buf)
    buf.seek(0)

    class Item:  # what DCP hands load_bytes
        class dest_index:
            fqn = "optimizers.opt.param_groups.0.lr"

    with pytest.raises(UnsafeFileError, match="param_groups.0.lr"):
        _Planner().load_bytes(Item, buf)
    assert not marker.exists()


def test_restricted_load_names_the_file_and_allows_only_what_it_is_told():
    assert restricted_load(pickle.dumps([1, "a", (2.0, None)]), {}) == [1, "a", (2.0, None)]
    with pytest.raises(UnsafeFileError, match=r"upload.bin was refused.*os.system"):
        restricted_load(b"cos\nsystem\n(S'true'\ntR.", {}, name="upload.bin")


# ------------------------------------------------------------- every entry point of a run folder
def _plant(folder: Path, marker: Path) -> None:
    """Replace the newest checkpoint of ``folder`` by one carrying a :class:`Plant`, with the
    manifest's sha256 and size rewritten to match (as a hostile folder would)."""
    entries = read_manifest(folder)
    path = folder / entries[0]["file"]
    state = torch.load(path, weights_only=True)
    state["extra"] = Plant(marker)
    torch.save(state, path)
    entries[0].update(sha256=sha256_file(path), bytes=path.stat().st_size)
    (folder / MANIFEST).write_text(json.dumps({"checkpoints": entries}))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished tiny tokenizer + transformer (4 steps, a checkpoint every 2) and its config."""
    run = tmp_path_factory.mktemp("run")
    cfg, tok, tokens, labels = ar_setup(run, steps=4, ckpt_every=2)
    train.train_ar(cfg, run, tok, tokens, labels, 8, progress=False)
    save_config(cfg, run / "config.yaml")
    return cfg, run, tok, tokens, labels


@pytest.fixture
def hostile(trained_run, tmp_path):
    """A copy of the finished run whose newest transformer and tokenizer checkpoints are
    planted; -> (cfg, run dir, marker, the transformer folder)."""
    import shutil

    cfg, run, *_ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    marker = tmp_path / "ran"
    ar = train.ar_dir(copy, cfg)
    _plant(ar, marker)
    return cfg, copy, marker, ar


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.name != ".lock"}


def test_every_entry_point_refuses_a_planted_checkpoint_and_writes_nothing(hostile, capsys):
    cfg, run, marker, ar = hostile
    before = _files(run)
    tok = train.load_tokenizer(train.tokenizer_dir(run, cfg))  # not planted: loads
    assert stages.finished(ar, cfg.ar.steps)  # answered from the manifest: nothing unpickled
    for load in (
        lambda: train.load_latest(ar),
        lambda: train.load_ar(ar, tok),
        lambda: stages.trained("ar", cfg, run, tok),
        lambda: runs.ensure_ar(cfg, run, progress=False),  # the notebooks' loader
        lambda: shipped.export("ar", cfg, run, "hostile-test", tok),
    ):
        with pytest.raises(UnsafeFileError, match=r"00004.pt was refused.*(builtins|io)\.open"):
            load()
    assert not (shipped.ROOT / "hostile-test").exists()
    args = ["--config", str(run / "config.yaml"), "--run-dir", str(run)]
    assert cli(["sample", *args, "--per-class", "1", "--batch", "8"]) == 1
    err = capsys.readouterr().err
    assert "UnsafeFileError" in err and "Traceback" not in err
    assert not marker.exists()
    assert _files(run) == before


def test_resuming_from_a_planted_checkpoint_is_refused(trained_run, tmp_path):
    """A partial run (stopped after 2 of 4 steps) whose checkpoint was planted: resuming it
    (train-ar, notebook 04) refuses it instead of unpickling it."""
    cfg, _, tok, tokens, labels = trained_run
    run = tmp_path / "run"
    train.train_ar(cfg, run, tok, tokens, labels, 8, progress=False, stop_after=2)
    marker = tmp_path / "ran"
    _plant(train.ar_dir(run, cfg), marker)
    with pytest.raises(UnsafeFileError, match="step-00000002.pt was refused"):
        train.train_ar(cfg, run, tok, tokens, labels, 8, progress=False)
    assert not marker.exists()


def test_no_code_in_cartlib_unpickles_outside_the_trust_module():
    """grep-able: ``weights_only=False`` and a bare ``pickle.load`` appear nowhere in cartlib
    but in cartlib/trust.py, which admits only what it is told."""
    found = subprocess.run(
        ["grep", "-rnE", r"weights_only\s*=\s*False|pickle\.loads?\(|Unpickler\(", "cartlib"],
        cwd=REPO, capture_output=True, text=True,
    ).stdout.splitlines()  # fmt: skip
    assert [line for line in found if not line.startswith("cartlib/trust.py")] == []
    assert sys.modules["cartlib.trust"]


def test_import_var_names_the_bad_file_and_leaves_no_folder(tmp_path, capsys):
    """A broken or planted ``--vae``/``--var`` file: a message naming which one (no traceback,
    no advice to unpickle it anyway), and no empty run folder left behind."""
    (tmp_path / "vae.pth").write_bytes(b"not a torch file")
    torch.save({"w": Plant(tmp_path / "ran")}, tmp_path / "var.pth")
    run = tmp_path / "run"
    files = {"--vae": tmp_path / "vae.pth", "--var": tmp_path / "var.pth"}
    for bad, message in (("--vae", "cannot be read as a torch weights file"),
                         ("--var", "was refused")):  # fmt: skip
        torch.save({}, tmp_path / "empty.pth")
        args = {k: str(tmp_path / "empty.pth") if k != bad else str(v) for k, v in files.items()}
        argv = ["import-var", "--preset", "var-d16-256", "--run-dir", str(run)]
        assert cli([*argv, *[x for kv in args.items() for x in kv]]) == 1
        err = capsys.readouterr().err
        assert f"({bad})" in err and message in err, err
        assert "Traceback" not in err and "weights_only=False" not in err
        assert not run.exists() and not (tmp_path / "ran").exists()
