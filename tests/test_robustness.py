"""Nothing silently wrong (issue 14): one test per defect a careless user ran into.

Artifacts keyed by every setting, range-checked settings, a locked run directory and a locked
results.json (two real processes), a decomposition cache keyed by the content of its files,
checkpoints with checksums and a fallback, fsync and disk-full errors, temp files of dead writers,
empty or unreadable image folders, and exit codes that fail a run that trained nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cartlib import data, io, runs, train
from cartlib.__main__ import main as cli
from cartlib.config import (
    FIXED_IN_KEYS,
    FIXED_IN_KEYS_OF,
    NOT_IN_KEYS,
    NOT_IN_KEYS_OF,
    SECTIONS,
    ConfigError,
    RunConfig,
    load_preset,
    save_config,
)
from cartlib.data import BadFileError, load_dataset
from cartlib.data.arrays import ArrayDataset
from cartlib.decompose import cache as dcache
from cartlib.params import notebook_config
from cartlib.ranges import RANGES

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- 1. artifact keys: every setting
def test_saved_models_are_keyed_by_precision_not_by_process_count(tmp_path):
    cfg = load_preset("smoke", mixed_precision="bf16")
    other = cfg.updated(mixed_precision="no")
    assert train.tokenizer_dir(tmp_path, other) != train.tokenizer_dir(tmp_path, cfg)
    assert train.ar_dir(tmp_path, other) != train.ar_dir(tmp_path, cfg)
    # a run moved to another number of GPUs resumes its folders (the steps are the same)
    moved = cfg.updated(num_processes=16)
    assert train.tokenizer_dir(tmp_path, moved) == train.tokenizer_dir(tmp_path, cfg)
    assert train.ar_dir(tmp_path, moved) == train.ar_dir(tmp_path, cfg)


def _another_value(cfg: RunConfig, section: str, name: str) -> RunConfig:
    """``cfg`` with setting ``section.name`` (section "" = top level) changed to a valid value."""
    if name == "quantizer":
        return cfg.with_quantizer("multiscale")
    obj = getattr(cfg, section) if section else cfg
    value = getattr(obj, name)
    special = {"width": 128, "heads": 1, "eps": 0.2, "root": "/elsewhere", "phi_kernel": 5}
    special |= {"arch": "var", "lr_schedule": "lin0", "weight_decay_end": 0.01, "mid_ratio": 1.125}
    special |= {"kind": "intrinsic", "init_from": "vae.pth", "straight_through": "var"}
    if name in special:
        new = special[name]
    elif isinstance(value, bool):
        new = not value
    elif isinstance(value, int):
        new = value + 1
    elif isinstance(value, float):
        new = value * 0.5 + 0.01
    elif isinstance(value, tuple):
        new = [*value, value[-1]]
    else:
        other_precision = "bf16" if cfg.precision == "no" else "no"  # auto keys as it resolves
        new = {"dataset": "cifar10", "bad_files": "skip", "mixed_precision": other_precision}[name]
    return cfg.updated(**({section: {name: new}} if section else {name: new}))


TRAINED = [s for s in SECTIONS if s != "sample"]  # sampling settings change no trained weights
SETTINGS = [
    (s, f.name)
    for s in TRAINED
    for f in dataclasses.fields(getattr(RunConfig(), s))
    if f.name not in (*NOT_IN_KEYS_OF.get(s, ()), *FIXED_IN_KEYS_OF.get(s, ()))
] + [
    ("", f.name)
    for f in dataclasses.fields(RunConfig())
    if f.name not in (*SECTIONS, *NOT_IN_KEYS, *FIXED_IN_KEYS)
]


@pytest.mark.parametrize("section, name", SETTINGS, ids=[f"{s}.{n}" for s, n in SETTINGS])
def test_every_setting_that_changes_a_result_changes_its_artifact_key(section, name):
    cfg = load_preset("smoke")  # order 3: the decomposition is part of the tokenizer
    changed = _another_value(cfg, section, name)
    assert changed.artifact_key("ar") != cfg.artifact_key("ar")
    tokenizer_depends = section != "ar"
    assert (changed.artifact_key("tokenizer") != cfg.artifact_key("tokenizer")) == tokenizer_depends
    assert cfg.updated(name="renamed").artifact_key("ar") == cfg.artifact_key("ar")


def test_sampling_and_speed_settings_leave_the_trained_models_keys_alone():
    cfg = load_preset("smoke")
    other = cfg.updated(sample={"guidance": 1.5, "top_k": 900, "rejection": 4})
    assert other.artifact_key("ar") == cfg.artifact_key("ar")
    faster = cfg.updated(data={"workers": 4, "shard_size": 100})
    assert faster.artifact_key("ar") == cfg.artifact_key("ar")
    saving = cfg.updated(tokenizer={"ckpt_every": 7}, ar={"ckpt_every": 11})  # issue 37, 11
    assert saving.artifact_key("ar") == cfg.artifact_key("ar")


# ----------------------------------------------------------------- 5. settings are range-checked
@pytest.mark.parametrize(
    "override, message",
    [
        ({"ar": {"depth": -1}}, r"ar\.depth=-1 is out of range: must be >= 1"),
        ({"ar": {"depth": 0}}, r"ar\.depth=0 is out of range: must be >= 1"),
        ({"ar": {"steps": -5}}, r"ar\.steps=-5 is out of range: must be >= 1"),
        ({"ar": {"steps": 0}}, r"ar\.steps=0 is out of range"),
        ({"tokenizer": {"steps": 0}}, r"tokenizer\.steps=0 is out of range"),
        ({"ar": {"batch_size": 0}}, r"ar\.batch_size=0 .*>= 1"),
        ({"tokenizer": {"codebook_size": 1}}, r"tokenizer\.codebook_size=1 .*>= 2"),
        ({"ar": {"ckpt_every": 0}}, r"ar\.ckpt_every=0 .*>= 1"),
        ({"decompose": {"order": 9}}, r"decompose\.order=9 is out of range: must be in \[0, 6\]"),
        ({"ar": {"lr": 0.0}}, r"ar\.lr=0\.0 .*> 0"),
        ({"ar": {"cond_drop": 1.0}}, r"ar\.cond_drop=1\.0 .*in \[0, 1\)"),
        ({"data": {"resolution": 4}}, r"data\.resolution=4 .*>= 8"),
        ({"tokenizer": {"ch_mult": [1, 0]}}, r"ch_mult=\(1, 0\) .*each item must be >= 1"),
        ({"mixed_precision": "fp32"}, r"mixed_precision='fp32' .*'no', 'bf16', 'fp16'"),
        ({"num_processes": 0}, r"num_processes=0 .*>= 1"),
    ],
)
def test_out_of_range_settings_are_refused_naming_setting_value_and_range(override, message):
    with pytest.raises(ConfigError, match=message):
        load_preset("smoke", **override)


def test_notebook_parameters_out_of_range_are_refused_before_anything_runs():
    for params, message in (({"depth": -1}, r"ar\.depth=-1"), ({"order": 9}, r"order=9")):
        with pytest.raises(ConfigError, match=message):
            notebook_config("04_train_ar", params)


def test_every_numeric_setting_has_a_range():
    for section in (*SECTIONS, ""):
        obj = getattr(RunConfig(), section) if section else RunConfig()
        for f in dataclasses.fields(obj):
            hint = str(f.type)
            if ("int" in hint or "float" in hint) and f.name not in SECTIONS:
                assert f.name in RANGES[section], f"{section}.{f.name} has no entry in RANGES"


# ------------------------------------------------ 3. locked run directory, results.json, caches
HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from cartlib import io
    ready, *folders = sys.argv[1:]
    locks = [io.dir_lock(f, "holding for a test") for f in folders]
    for lock in locks:
        lock.__enter__()
    fd, tmp = io._temp_file(Path(folders[0]) / "last.pt")  # a save in progress
    Path(ready).write_text(tmp)
    time.sleep(120)
    """
)


def _start_holder(tmp_path: Path, *folders: Path) -> tuple[subprocess.Popen, Path]:
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(ready), *map(str, folders)])
    deadline = time.time() + 120
    while not ready.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ready.exists(), "the lock holder did not start"
    return proc, Path(ready.read_text())


def _tiny_loop(folder: Path, steps: int = 2):
    lin = torch.nn.Linear(2, 1)
    return train.run_loop(
        accelerator=train.make_accelerator(),
        modules={"lin": lin},
        optimizers={},
        schedulers={},
        step_fn=lambda step: {"loss": 1.0},
        total_steps=steps,
        ckpt_dir=folder,
        ckpt_every=1,
        progress=False,
    )


def test_second_writer_is_told_the_holder_and_a_dead_writers_temp_file_goes(tmp_path, monkeypatch):
    folder = tmp_path / "run" / "ar-stage"
    proc, temp = _start_holder(tmp_path, folder)
    try:
        monkeypatch.setenv("CART_LOCK_TIMEOUT", "0.5")
        with pytest.raises(
            io.LockTimeout, match=rf"locked by pid {proc.pid} on {socket.gethostname()}"
        ):
            _tiny_loop(folder)
        assert temp.exists()  # its writer is alive: kept
    finally:
        proc.send_signal(signal.SIGKILL)  # killed mid-save: the kernel frees its lock
        proc.wait()
    fd, mine = io._temp_file(folder / "history.json")  # a live writer's (this process)
    os.close(fd)
    assert [h["step"] for h in _tiny_loop(folder)] == [0, 1]
    assert not temp.exists() and Path(mine).exists()


def test_every_stage_that_writes_takes_its_folder_lock(tmp_path, monkeypatch):
    cfg = load_preset("smoke")
    run = tmp_path / "run"
    proc, _ = _start_holder(tmp_path, train.tokenizer_dir(run, cfg), train.ar_dir(run, cfg))
    monkeypatch.setenv("CART_LOCK_TIMEOUT", "0.3")
    try:
        for stage in (runs.ensure_tokenizer, runs.ensure_ar):
            with pytest.raises(io.LockTimeout, match=f"pid {proc.pid}"):
                stage(cfg, run, progress=False)
        with pytest.raises(io.LockTimeout, match=f"pid {proc.pid}"):
            runs.ensure_tokens(cfg, run, None, "train", progress=False)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


WRITER = textwrap.dedent(
    """
    import sys, time
    from cartlib import io
    run, who, n, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    time.sleep(max(0, start - time.time()))
    for i in range(n):
        io.save_results(run, f"{who}-{i}", {"i": i})
    """
)


def test_two_notebooks_writing_results_at_once_lose_no_section(tmp_path):
    start, n = time.time() + 4, 60  # both begin together, after their imports
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), who, str(n), str(start)])
        for who in ("a", "b")
    ]
    assert [p.wait(timeout=180) for p in procs] == [0, 0]
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == 2 * n


def test_decomposition_cache_file_is_locked_while_computed(tmp_path, monkeypatch):
    monkeypatch.setenv("CART_CACHE_DIR", str(tmp_path / "cache"))
    ds = _array_dataset(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    path = dcache.cache_path(dcache.cache_key(ds, 1, 1.0, 0.01, None))
    lock = path.with_name(f".{path.name}.lock")
    holder = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from cartlib import io
        with io.file_lock({str(lock)!r}, "decomposing"):
            Path({str(tmp_path / "ready")!r}).write_text("")
            time.sleep(120)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", holder])
    try:
        while not (tmp_path / "ready").exists() and proc.poll() is None:
            time.sleep(0.05)
        monkeypatch.setenv("CART_LOCK_TIMEOUT", "0.3")
        with pytest.raises(io.LockTimeout, match=f"pid {proc.pid}"):
            dcache.decompose_dataset(ds, order=1, progress=False)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


# ------------------------------------------------------- 2. decomposition cache keyed by content
def _array_dataset(images: torch.Tensor) -> ArrayDataset:
    return ArrayDataset("arrays", "train", images, [0] * len(images), ["a"], 8, "memory")


def test_edited_image_folder_file_recomputes_the_decomposition(tmp_path, monkeypatch):
    monkeypatch.setenv("CART_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / "a" / f"{i}.png")

    def load():
        return data.load_dataset("imagefolder", resolution=8, root=str(root), progress=False)

    ds = load()
    first = dcache.decompose_dataset(ds, order=1, progress=False)
    fingerprinted = {ds.files[i] for i in dcache._fingerprint_ids(len(ds))}
    edited = next(p for p in ds.files if p not in fingerprinted)
    Image.new("RGB", (8, 8), (0, 200, 0)).save(edited)  # not one of the 4 fingerprint images
    with pytest.warns(UserWarning, match="changed since it was written.*recomputing"):
        again = dcache.decompose_dataset(load(), order=1, progress=False)
    i = ds.files.index(edited)
    assert not torch.equal(again[i], first[i])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the recomputed file is reused without a warning
        assert torch.equal(dcache.decompose_dataset(load(), order=1, progress=False), again)


def test_changed_pixels_of_an_in_memory_dataset_recompute_the_decomposition(tmp_path, monkeypatch):
    monkeypatch.setenv("CART_CACHE_DIR", str(tmp_path / "cache"))
    images = torch.zeros(6, 3, 8, 8, dtype=torch.uint8)
    dcache.decompose_dataset(_array_dataset(images), order=1, progress=False)
    images[1, :, 2:5, 2:5] = 255  # item 1 is not a fingerprint image; same name, split, size
    with pytest.warns(UserWarning, match="changed since it was written"):
        again = dcache.decompose_dataset(_array_dataset(images), order=1, progress=False)
    assert again[1].float().max() > 0.1


# --------------------------------------------------------------- 4. exit codes that do not lie
def test_notebook_04_that_trains_nothing_fails_its_papermill_run(tmp_path):
    out = tmp_path / "04.ipynb"
    args = ["-p", "depth", "30", "-p", "run_dir", str(tmp_path / "run"), "-k", "cartlib",
            "-p", "num_machines", "2", "-p", "main_process_ip", "10.0.0.1"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "papermill", str(ROOT / "notebooks" / "04_train_ar.ipynb"),
         str(out), *args, "--cwd", str(ROOT / "notebooks"), "--no-progress-bar"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert "NothingTrainedError" in proc.stderr
    printed = out.read_text()
    assert "Not training here. What it needs" in printed and "accelerate launch" in printed
    # the plan's layout and one command per machine (16 GPUs over 2 machines), plus SLURM
    assert "micro-batch" in printed and "accumulation" in printed and "machine 1:" in printed
    assert (tmp_path / "run" / "train-ar.slurm").exists()


@pytest.mark.parametrize(
    "preset, override, why",
    [
        ("cart-d30-256", {}, "data.root is not set"),
        ("smoke", {"data": {"root": "/no/such/data_rot"}}, "does not exist"),
    ],
)
def test_train_ar_command_that_trains_nothing_exits_non_zero(
    tmp_path, capsys, preset, override, why
):
    config = tmp_path / "c.yaml"
    save_config(load_preset(preset, **override), config)
    code = cli(["train-ar", "--config", str(config), "--run-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code != 0 and "Not training here" in out and why in out
    assert not any((tmp_path / "run").glob("*-*/last.pt"))  # nothing trained


# ------------------------------------------------------- 6. checkpoints, fsync, disk, data files
def test_weight_bit_flip_is_caught_by_the_checksum_and_the_previous_checkpoint_used(tmp_path):
    lin = torch.nn.Linear(4, 4)
    lin.weight.data.fill_(1.2345)
    train.run_loop(
        accelerator=train.make_accelerator(),
        modules={"lin": lin},
        optimizers={},
        schedulers={},
        step_fn=lambda step: {"loss": 1.0},
        total_steps=4,
        ckpt_dir=tmp_path,
        ckpt_every=2,
        progress=False,
    )
    last = (tmp_path / train.CKPT_NAME).resolve()
    blob = bytearray(last.read_bytes())
    at = blob.find(struct.pack("<f", 1.2345) * 16)
    blob[at + 5] ^= 0x01  # one bit of one weight
    last.write_bytes(bytes(blob))
    flipped = train.load_checkpoint(last)["modules"]["lin"]["weight"]  # torch alone: loads
    assert (flipped != 1.2345).sum() == 1
    with pytest.warns(UserWarning, match=rf"{last.name} is unusable: its sha256 differs"):
        state, path = train.load_latest(tmp_path)
    assert state["step"] == 2 and path.name == "step-00000002.pt"
    assert torch.equal(state["modules"]["lin"]["weight"], torch.full((4, 4), 1.2345))


@pytest.mark.parametrize("write", ["torch", "bytes"])
def test_writes_are_fsynced_before_the_rename(tmp_path, monkeypatch, write):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("rename") or real_replace(a, b))
    if write == "torch":
        io.atomic_torch_save({"w": torch.zeros(3)}, tmp_path / "a.pt")
    else:
        io.atomic_write_bytes(tmp_path / "a.json", b"{}")
    assert events[:2] == ["fsync", "rename"]


FULL_DISK = textwrap.dedent(
    """
    import os, sys, torch
    from cartlib import io
    folder = sys.argv[1]
    for name, write in (("w.pt", lambda p: io.atomic_torch_save({"w": torch.zeros(2**20)}, p)),
                        ("w.bin", lambda p: io.atomic_write_bytes(p, bytes(2**20)))):
        try:
            write(folder + "/" + name)
        except io.DiskFullError as e:
            print(e)
    print("left:", os.listdir(folder))
    """
)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare to mount a tiny tmpfs")
def test_full_disk_names_the_folder_and_the_size_and_leaves_no_temp_file(tmp_path):
    """A real ENOSPC: a 256 KiB tmpfs in a private mount namespace, a 4 MB and a 1 MB write."""
    disk, script = tmp_path / "disk", tmp_path / "fill.py"
    disk.mkdir()
    script.write_text(FULL_DISK)
    mount = f"mount -t tmpfs -o size=256k tmpfs {disk} || exit 77; {sys.executable} {script} {disk}"
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", mount], capture_output=True, text=True)
    if proc.returncode in (1, 77) and not proc.stdout and "Traceback" not in proc.stderr:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {proc.stderr[:200]}")
    lines = proc.stdout.splitlines()
    assert len(lines) == 3, proc.stdout + proc.stderr
    assert lines[0].startswith(f"no space left on {disk}, 0.00419 GB needed to write w.pt")
    assert lines[1].startswith(f"no space left on {disk}, 0.00105 GB needed to write w.bin")
    assert lines[2] == "left: []"  # no temp file


def _png(path: Path, colour=(10, 20, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def test_empty_class_folders_are_not_classes(tmp_path):
    for split in ("train", "val"):
        _png(tmp_path / split / "cat" / "1.png")
        _png(tmp_path / split / "dog" / "1.png")
        (tmp_path / split / "empty").mkdir()
        (tmp_path / split / "notes").mkdir()
        (tmp_path / split / "notes" / "readme.txt").write_text("no images here")
    with pytest.warns(UserWarning, match="without images are not classes: empty, notes"):
        ds = data.load_dataset("imagefolder", resolution=8, root=str(tmp_path))
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2 and sorted(ds.labels) == [0, 1]
    with pytest.warns(UserWarning, match="empty, notes"):
        assert data.imagefolder_num_classes(tmp_path) == 2


def test_image_folder_whose_files_are_all_bad_says_so_under_skip(tmp_path):
    for i in range(3):
        (tmp_path / "a" / f"{i}.png").parent.mkdir(exist_ok=True)
        (tmp_path / "a" / f"{i}.png").write_text("not a png")
    with pytest.raises(data.BadFileError, match=r"none of the 3 image file\(s\).*can be read"):
        data.load_dataset("imagefolder", resolution=8, root=str(tmp_path), bad_files="skip")


# ------------------------------------------------- 27. command-line values refused before writing
@pytest.mark.parametrize(
    "args, named",
    [(["--per-class", "0"], "per_class=0"), (["--per-class", "-5"], "per_class=-5"),
     (["--batch", "0"], "batch=0")],
)  # fmt: skip
def test_sample_refuses_a_count_below_one_and_writes_nothing(tmp_path, capsys, args, named):
    config = tmp_path / "c.yaml"
    save_config(load_preset("smoke"), config)
    run_dir = tmp_path / "run"
    assert cli(["sample", "--config", str(config), "--run-dir", str(run_dir), *args]) == 1
    err = capsys.readouterr().err
    assert named in err and ">= 1" in err and "Traceback" not in err
    assert not any(run_dir.iterdir())  # no model folder, no sample folder


def test_a_run_dir_that_is_a_file_and_a_broken_results_file_are_named(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="run_dir .*/f is a file, not a folder"):
        runs.resolve_run_dir(tmp_path / "f")
    (tmp_path / "results.json").write_text('{"01": {')
    with pytest.raises(ValueError, match=r"results.json is not valid JSON .* move it away"):
        runs.save_results(tmp_path, "02", {"a": 1})
    assert (tmp_path / "results.json").read_text() == '{"01": {'  # left as it was


@pytest.mark.parametrize("error", [FloatingPointError("loss is nan at step 3: lower the lr"),
                                   io.LockTimeout("lock held by pid 1")])  # fmt: skip
def test_stage_errors_with_a_message_print_it_without_a_traceback(tmp_path, capsys, monkeypatch,
                                                                  error):  # fmt: skip
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(runs, "ensure_tokenizer", fail)
    config = tmp_path / "c.yaml"
    save_config(load_preset("smoke"), config)
    assert cli(["train-tokenizer", "--config", str(config), "--run-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert str(error) in err and type(error).__name__ in err and "Traceback" not in err


def test_a_folder_link_loop_or_a_second_link_is_refused_with_its_path(tmp_path):
    from cartlib.data.folder import imagefolder

    root, classes = tmp_path / "D", ["a", "b"]
    for c in classes:
        (root / c).mkdir(parents=True)
        for k in range(10):
            Image.new("RGB", (16, 16), (25 * k, 100, 50)).save(root / c / f"{k}.png")

    def listing():
        return imagefolder("train", 16, str(root), None, "error", False, False)

    (root / "c_loop").mkdir()
    (root / "c_loop" / "up").symlink_to("..")  # would invent a class, and loop forever
    with pytest.raises(ValueError, match=r"c_loop/up leads to .* again through a folder link"):
        listing()
    (root / "c_loop" / "up").unlink()
    (root / "c_loop").rmdir()
    (root / "twice").symlink_to(root / "a")  # the same images under two labels
    with pytest.raises(ValueError, match="again through a folder link"):
        listing()
    (root / "twice").unlink()
    (tmp_path / "elsewhere").mkdir()
    shutil.move(root / "b", tmp_path / "elsewhere" / "b")
    (root / "b").symlink_to(tmp_path / "elsewhere" / "b")  # ImageNet-style links still work
    train, test = listing(), imagefolder("test", 16, str(root), None, "error", False, False)
    assert len(train) + len(test) == 20 and train.classes == classes


def test_a_stage_whose_newest_checkpoint_is_damaged_is_not_finished(tmp_path):
    """The CLI stages (extract-tokens, sample) must not encode with an older checkpoint as if
    the tokenizer were finished: the newest one is checked as the loader checks it."""
    from test_train import tiny_cfg, tiny_data

    from cartlib import stages
    from cartlib.train.checkpoints import read_manifest

    cfg = tiny_cfg(steps=2, ckpt_every=1)
    train.train_tokenizer(cfg, tmp_path, progress=False, data=tiny_data())
    assert stages.trained("tokenizer", cfg, tmp_path) is not None
    folder = train.tokenizer_dir(tmp_path, cfg)
    newest = folder / read_manifest(folder)[0]["file"]
    blob = bytearray(newest.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    newest.write_bytes(bytes(blob))
    with pytest.raises(FileNotFoundError, match=r"no finished model any more"):
        stages.trained("tokenizer", cfg, tmp_path)


def test_float_images_are_read_as_their_values_and_nan_ones_are_refused(tmp_path):
    """Issue 37, silently wrong 5: a 32-bit float TIFF in [0, 1] loaded all black (clipped as if
    0-255) and a NaN one loaded black and trained; ArrayDataset took float images and each
    ds[i] divided the caller's own tensor by 255 in place."""
    from cartlib.data import load_image

    grey = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(grey, mode="F").save(tmp_path / "f.tif")
    x = load_image(tmp_path / "f.tif", 8)
    assert torch.allclose(x[0], torch.from_numpy(grey), atol=1 / 255)
    nan = grey.copy()
    nan[2, 3] = np.nan
    (tmp_path / "c").mkdir()
    Image.fromarray(nan, mode="F").save(tmp_path / "c" / "nan.tif")
    ds = load_dataset("imagefolder", root=str(tmp_path / "c"), resolution=8, split="train")
    with pytest.raises(BadFileError, match=r"nan.tif.*1 NaN or infinite"):
        ds[0]
    floats = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"must be uint8.*got torch.float32.*\* 255"):
        _array_dataset(floats)
    images = (floats * 255).round().to(torch.uint8)
    before = images.clone()
    ds = _array_dataset(images)
    ds[0], ds[1]
    assert torch.equal(images, before)


@pytest.mark.parametrize("name", ["guidance", "temperature", "top_p"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_infinite_notebook_parameters_are_refused(name, value):
    """Issue 37, silently wrong 6: ``-p guidance nan`` drew unguided samples with rc 0 (``t = ...
    if cfg > 0 else 0``) and ``-p temperature nan`` died inside torch.multinomial."""
    with pytest.raises(ConfigError, match=rf"{name}=.* must be a finite number"):
        notebook_config("05_sampling", {name: value})


def test_yaml_numbers_syntax_slips_and_links_in_config_files(tmp_path):
    """Issue 37, finding 12 and crash 8: ``lr: 1e-4`` was the string "1e-4" (YAML 1.1) with no
    hint, a syntax slip a scanner traceback naming no file, and save_config replaced a symlink
    at its path instead of writing through it."""
    from cartlib.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text("ar:\n  lr: 1e-4\n  warmup: 5\n")
    assert load_config(path).ar.lr == 1e-4
    path.write_text("ar: {lr: '1e-4'}\n")
    with pytest.raises(ConfigError, match=r"run.yaml: ar.lr='1e-4' must be a number.*without q"):
        load_config(path)
    path.write_text("ar:\n  lr: [1e-4\n  warmup: 5\n")
    with pytest.raises(ConfigError, match=r"run.yaml is not valid YAML at line \d+, column \d+"):
        load_config(path)
    target = tmp_path / "kept" / "config.yaml"
    target.parent.mkdir()
    link = tmp_path / "config.yaml"
    link.symlink_to(target)
    save_config(load_preset("smoke"), link)
    assert link.is_symlink() and load_config(target).name == "smoke"


def test_a_finished_run_on_read_only_storage_opens_and_writing_there_says_why(tmp_path):
    """Issue 37, crash 7: every command and the notebooks' loader opened ``.lock`` for writing,
    so a finished run on read-only storage could not even be loaded (OSError EROFS). Reading a
    finished stage takes no lock; a stage that must write names the folder and the fix."""
    import errno

    from test_train import ar_setup

    cfg, tok, tokens, labels = ar_setup(tmp_path, steps=2, ckpt_every=2)
    train.train_ar(cfg, tmp_path, tok, tokens, labels, 8, progress=False)
    real_open = os.open

    def read_only(path, flags, *args):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(io.os, "open", read_only)
        _, model = runs.ensure_ar(cfg, tmp_path, progress=False)  # the notebooks' loader
        assert model is not None
        message = r"cannot write in .*Read-only file system.*copy the run folder to writable"
        with pytest.raises(io.ReadOnlyError, match=message), io.dir_lock(tmp_path / "s", "x"):
            pass


def test_huge_images_are_refused_by_pixel_count_naming_the_setting(tmp_path, monkeypatch):
    """Issue 37, finding 12: a 12000^2 PNG (420 KB, under PIL's bomb limit) took 2.3 GB of RAM
    to decode (2.2 GB peak measured); a JPEG is decoded at reduced size first and passes."""
    folder = tmp_path / "train" / "c"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 10, 10)).save(folder / "big.png")
    Image.new("RGB", (64, 64), (200, 10, 10)).save(folder / "big.jpg", quality=90)
    monkeypatch.setenv("CART_MAX_IMAGE_PIXELS", "1000")
    ds = load_dataset("imagefolder", root=str(tmp_path), resolution=8, split="train")
    by_name = {p.name: i for i, p in enumerate(ds.files)}
    with pytest.raises(BadFileError, match=r"big.png.*64 x 64.*raise \$CART_MAX_IMAGE_PIXELS"):
        ds[by_name["big.png"]]
    assert ds[by_name["big.jpg"]][0].shape == (3, 8, 8)  # an 8x8-ish JPEG draft: 64-1000 px


def test_cli_paths_are_relative_to_the_current_folder(tmp_path, monkeypatch, capsys):
    """Issue 37, finding 10: ``--run-dir run`` resolved against the project checkout (while
    ``--config`` resolved against the current folder): from another folder it wrote into the
    checkout. An uncreatable ``run_dir`` (``/proc/x``) is named, not a raw FileNotFoundError."""
    save_config(load_preset("smoke"), tmp_path / "smoke.yaml")
    monkeypatch.chdir(tmp_path)
    assert cli(["sample", "--config", "smoke.yaml", "--run-dir", "rel", "--per-class", "1"]) == 1
    assert "no finished tokenizer" in capsys.readouterr().err
    assert list((tmp_path / "rel").glob("tokenizer-*/config.yaml"))  # the command's --config
    assert not (io.project_root() / "rel").exists()
    with pytest.raises(ValueError, match=r"run_dir /proc/x/y cannot be created"):
        io.resolve_run_dir("/proc/x/y")


def test_a_full_disk_while_writing_shard_labels_is_named_and_leaves_no_temp_file(
    tmp_path, monkeypatch
):
    """Issue 37, crash 8: a raw ``OSError: [Errno 28]`` from shards.py, no folder or size
    named, and a 0-byte ``.tmp`` left behind."""
    import errno

    import numpy as np

    from cartlib import shards

    meta = {"views": 1, "seq_len": 3, "tokenizer": "t"}
    writer = shards.ShardWriter(tmp_path, shards.Shard(0, 0, 2), meta)
    writer.write(0, np.zeros((2, 3), np.uint16))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shards.np, "save", full)
    with pytest.raises(io.DiskFullError, match=rf"no space left on {tmp_path}, .* GB needed"):
        writer.finish(np.zeros(2, np.int32))
    assert not list(tmp_path.glob(".*labels*.tmp"))
